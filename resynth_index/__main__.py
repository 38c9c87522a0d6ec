from resynth_index.cli import main

main()
