from services.observability.main import main

main()
