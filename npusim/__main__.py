from npusim.cli import run

run()
