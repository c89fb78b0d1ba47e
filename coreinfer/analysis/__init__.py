"""The properties CoreInfer rests on, measured (measure.py), cluster sets built from a corpus
(clustering.py), and their commands (cli.py)."""
