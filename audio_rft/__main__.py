from audio_rft.cli import main

if __name__ == "__main__":
    main()
