from clt_pipe.cli import main

main()
