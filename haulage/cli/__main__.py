from haulage.cli.main import main

raise SystemExit(main())
