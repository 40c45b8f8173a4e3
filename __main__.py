from crucible.jobs.cli import main

main()
