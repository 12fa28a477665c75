from central_hub.cli import main

raise SystemExit(main())
