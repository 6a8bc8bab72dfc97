from saisa_edge.cli import main

main()
