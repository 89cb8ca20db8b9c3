"""`tinyshield demo`: the main job end to end on the default (emulated) board."""


def register(sub):
    p = sub.add_parser("demo", help="run the main job end to end on the emulated board",
                       description="Train or load the tiny ViT, then run the deployment path on the default board.")
    p.set_defaults(func=run)


def run(args):
    from edge.data import data_dir
    from edge.recipes.vit_mnist import train

    fallback = data_dir(required=False) is None
    r = train(fallback_data=fallback)
    print(f"data: {r.metrics['data']}")
    print(f"vit-mnist: test accuracy {r.metrics['test_accuracy']:.4f} on {r.metrics['test_images']} images "
          f"({'cached' if r.cached else 'trained'}; {r.path})")
