"""The execution graph: nodes, compilation from a resolved spec, content keys, plan rendering."""
