from jaxpipe.cli import main

main()
