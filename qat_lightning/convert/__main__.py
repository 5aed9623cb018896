from qat_lightning.convert.cli import main

main()
