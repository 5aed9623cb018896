from qat_lightning.cli import main

main()
