from meshorch.cli.main import main

raise SystemExit(main())
