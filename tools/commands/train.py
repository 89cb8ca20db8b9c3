"""`tinyshield train RECIPE`: train a model from a recipe (cached by config hash)."""


def register(sub):
    p = sub.add_parser("train", help="train a model from a recipe (vit-mnist, ...)",
                       description="Train a model from a recipe; a second call with the same config is instant.")
    p.add_argument("recipe", help="recipe name, e.g. vit-mnist")
    p.add_argument("--force", action="store_true", help="retrain even when a cached model exists")
    p.add_argument("--epochs", type=int, help="override the recipe's epoch count")
    p.set_defaults(func=run)


def run(args):
    from edge.errors import TinyshieldError
    from edge.recipes import recipes

    table = recipes()
    if args.recipe not in table:
        raise TinyshieldError(f"unknown recipe {args.recipe!r}; choose one of {', '.join(table)}")
    overrides = {"epochs": args.epochs} if args.epochs else {}
    r = table[args.recipe](force=args.force, **overrides)
    print(f"{r.name}: {'cached ' if r.cached else ''}model at {r.path}")
    for k, v in r.metrics.items():
        print(f"  {k}: {v}")
