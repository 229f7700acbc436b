from lorafleet.app.cli import main

main()
