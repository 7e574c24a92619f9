def main(argv=None):
    raise SystemExit("todo")
