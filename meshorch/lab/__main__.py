from meshorch.lab.cli import main

raise SystemExit(main())
