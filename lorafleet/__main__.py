from lorafleet.app.cli import main

if __name__ == "__main__":  # not when a multiprocessing child imports it
    main()
