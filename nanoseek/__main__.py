from nanoseek.cli import main

raise SystemExit(main())
