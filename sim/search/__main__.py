from sim.search.run import main

main()
