from mlx_fusion.cli import main

main()
