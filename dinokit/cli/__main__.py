from dinokit.cli import main

main()
