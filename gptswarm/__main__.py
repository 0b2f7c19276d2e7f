from gptswarm.cli import main

main()
