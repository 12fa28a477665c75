from meshorch.cli import main

raise SystemExit(main())
