"""Placement: measure the network (`probe`), describe a cluster (`cluster`), score layouts with
jaxpipe's cost model and with DT-FM's (`dtfm`), and search for the layout to run (`search`)."""
