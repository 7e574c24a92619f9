from bnlab.cli import main

raise SystemExit(main())
