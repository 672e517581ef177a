"""Commands that learn on frozen features: knn, probe, layers."""

from __future__ import annotations

from pathlib import Path

import click

from ..wording import counted
from .base import MODEL_HELP, cli, device_option, output_options, print_json, storage_options


def predict_inputs(fn):
    """Where --predict reads fields from, and the device to embed on."""
    for decorator in reversed((
        click.option("--text-field", default="text", show_default=True, help="--predict tables: the text field."),
        click.option("--image-field", default="image", show_default=True, help="--predict tables: the image field."),
        click.option("--id-field", help="--predict tables: the id field."),
        device_option(),
    )):
        fn = decorator(fn)
    return fn


def _eval_options(fn):
    for decorator in reversed((
        click.option("--label-field", default="label", show_default=True, help="The stored field holding labels."),
        click.option("--test", type=click.Path(file_okay=False),
                     help="Evaluate on this labelled collection (same model) instead of cross-validation."),
        click.option("--folds", type=click.IntRange(min=2), help="Cross-validation folds (default 5)."),
        click.option("--out", type=click.Path(file_okay=False), help="Write the JSON report and a confusion PNG here."),
    )):
        fn = decorator(fn)
    return fn


def _print_eval(result: dict, what: str) -> None:
    split = f"test collection {result['test']}" if "test" in result else f"{result['folds']}-fold cross-validation"
    click.echo(f"{what}: accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f} "
               f"({split}; {counted(result['n_test'], 'prediction')}, {counted(result['n_train'], 'training row')}"
               + (f", {counted(result['unlabelled'], 'unlabelled row')} left out" if result.get("unlabelled") else "")
               + ")")
    click.echo(f"{'class':24} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}")
    for cls, m in result["per_class"].items():
        click.echo(f"{cls[:24]:24} {m['precision']:9.3f} {m['recall']:7.3f} {m['f1']:6.3f} {m['support']:8d}")
    for name, path in result.get("files", {}).items():
        click.echo(f"{name}: {path}")


def _print_predictions(predictions: list[dict], as_json: bool) -> None:
    if as_json:
        print_json(predictions)
        return
    for p in predictions:
        top = ", ".join(f"{c} {v:.3f}" for c, v in list(p["probabilities"].items())[:3])
        near = ", ".join(n["id"] for n in p.get("neighbours", [])[:3])
        click.echo(f"{p['id']}\t{p['label']}\t{top}" + (f"\tnearest: {near}" if near else ""))


@cli.command()
@click.argument("collection", type=click.Path(file_okay=False))
@_eval_options
@click.option("--eval", "evaluate", is_flag=True, help="Measure accuracy (cross-validation or --test).")
@click.option("--predict", "predict", multiple=True, help="Classify these sources (files, folders, tables, - for "
              "JSONL on stdin); repeatable.")
@click.option("-k", type=click.IntRange(min=1), default=20, show_default=True, help="Neighbours that vote.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.07, show_default=True,
              help="Weighted vote: each neighbour adds exp(similarity / T).")
@click.option("--vote", type=click.Choice(["weighted", "majority"]), default="weighted", show_default=True,
              help="weighted: by similarity (see --temperature); majority: one vote per neighbour.")
@click.option("--engine", type=click.Choice(["auto", "exact", "faiss"]), default="auto", show_default=True,
              help="auto: the collection's FAISS index when it has one, else exact.")
@click.option("--zero-shot", "zero_shot", metavar="CLASSES", help="No neighbours: label every stored item with "
              "the nearest class prompt of a joint text-image model (clip:, open_clip:). CLASSES: cat,dog,car or a "
              "file with one class name per line. With --eval: scored against the stored labels.")
@click.option("--template", "templates", multiple=True, help="--zero-shot prompt with {} for the class name "
              "(default: 'a photo of a {}'); repeat to average several.")
@predict_inputs
@storage_options
@output_options
def knn(collection, label_field, test, folds, out, evaluate, predict, k, temperature, vote, engine, zero_shot,
        templates, text_field, image_field, id_field, device, as_json, quiet):
    """k-NN classifier on the stored embeddings: --eval or --predict.

    Over COLLECTION's labelled rows, DINO protocol: cosine, top-20, exp(sim/0.07) votes. With --zero-shot,
    a joint text-image model's class prompts label the items instead."""
    from ..tasks.knn import knn_eval, knn_predict

    if templates and not zero_shot:
        raise click.UsageError("--template goes with --zero-shot")
    if zero_shot:
        _zero_shot(collection, zero_shot, templates, evaluate, predict, test, folds, out, label_field, device, as_json)
        return
    if evaluate == bool(predict):
        raise click.UsageError("give --eval or --predict SOURCE")
    if predict:
        if test or folds or out:
            raise click.UsageError("--predict takes no --test, --folds or --out")
        preds = knn_predict(collection, list(predict), label_field=label_field, k=k, temperature=temperature,
                            vote=vote, engine=engine, device=device, text_field=text_field, image_field=image_field,
                            id_field=id_field)
        _print_predictions(preds, as_json)
        return
    result = knn_eval(collection, label_field, test=test, folds=folds, k=k, temperature=temperature, vote=vote,
                      engine=engine, out=out)
    if as_json:
        print_json(result)
    else:
        _print_eval(result, f"k-NN ({result['vote']}, k={result['k']}, T={result['temperature']}, {result['engine']})")


def _zero_shot(collection, classes, templates, evaluate, predict, test, folds, out, label_field, device, as_json):
    from ..tasks.zeroshot import DEFAULT_TEMPLATE, zero_shot_eval, zero_shot_predict

    if predict or test or folds or out:
        raise click.UsageError("--zero-shot labels the collection's own items: no --predict, --test, --folds or --out")
    templates = list(templates) or [DEFAULT_TEMPLATE]
    if not evaluate:
        _print_predictions(zero_shot_predict(collection, classes, templates=templates, device=device), as_json)
        return
    result = zero_shot_eval(collection, classes, label_field, templates=templates, device=device)
    if as_json:
        print_json(result)
        return
    click.echo(f"zero-shot ({counted(len(result['zero_shot']), 'class', 'classes')}, "
               f"{counted(len(result['templates']), 'template')}): accuracy {result['accuracy']:.4f}, "
               f"macro-F1 {result['macro_f1']:.4f} ({counted(result['n_test'], 'labelled item')})")
    for cls, m in result["per_class"].items():
        click.echo(f"{cls[:24]:24} {m['precision']:9.3f} {m['recall']:7.3f} {m['f1']:6.3f} {m['support']:8d}")


@cli.command()
@click.argument("collection", type=click.Path())
@_eval_options
@click.option("--save", type=click.Path(dir_okay=False), help="Fit the head on every labelled row and save it "
              "(.npz) for `indexer probe HEAD --predict`.")
@click.option("--predict", "predict", multiple=True, help="Classify these sources with a saved head (COLLECTION "
              "is then the head file) or with a head fitted on COLLECTION; repeatable.")
@predict_inputs
@storage_options
@output_options
def probe(collection, label_field, test, folds, out, save, predict, text_field, image_field, id_field, device,
          as_json, quiet):
    """Linear probe (logistic regression) on the stored embeddings.

    Fitted on COLLECTION's frozen features, C chosen on a validation split. COLLECTION may be a head saved
    with --save when used with --predict."""
    from ..tasks.probe import probe_eval, probe_predict

    if Path(collection).is_file() and not predict:
        raise click.UsageError(f"{collection} is a file: a saved head is used with --predict SOURCE")
    if predict:
        if test or folds or save or out:
            raise click.UsageError("--predict takes no --test, --folds, --save or --out")
        preds = probe_predict(collection, list(predict), label_field=label_field, device=device,
                              text_field=text_field, image_field=image_field, id_field=id_field)
        _print_predictions(preds, as_json)
        return
    result = probe_eval(collection, label_field, test=test, folds=folds, save=save, out=out)
    if as_json:
        print_json(result)
        return
    _print_eval(result, f"linear probe (C {', '.join(f'{c:g}' for c in result['C'])})")
    if result.get("saved"):
        click.echo(f"head saved: {result['saved']}")


@cli.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--label-field", default="label", show_default=True,
              help="The field holding labels (`folder`: an image's parent folder names its class).")
@click.option("--model", help=f"{MODEL_HELP}. Default: minilm for text, efficientnet-lite0 for images.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local state-dict file for an image CNN.")
@click.option("--layers", help="all (default) or a comma list: hidden-state numbers for transformers, module "
              "names (or penultimate) for CNNs.")
@click.option("--pooling", help="Transformers: comma list of cls, mean, max, pooler (default: cls,mean,max).")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="Cross-validation folds.")
@click.option("-k", type=click.IntRange(min=1), default=20, show_default=True, help="k-NN neighbours.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.07, show_default=True,
              help="k-NN weighted vote temperature.")
@click.option("--max-items", type=click.IntRange(min=2), help="Use at most this many inputs.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Items per forward pass (default: the model's).")
@click.option("--out", type=click.Path(file_okay=False), help="Write layers.json and layers.png here.")
@click.option("--precision", type=click.Choice(["default", "fp32", "fp16", "bf16", "int8"]), default="default",
              show_default=True, help="As ingest's: compare the layers of the model you will index with "
              "(default: fp16 on CUDA, fp32 on CPU; int8: text models, torch backend).")
@click.option("--backend", type=click.Choice(["torch", "onnx", "openvino"]), default="torch", show_default=True,
              help="Every layer comes from one torch forward pass: onnx and openvino exports give the final "
                   "features only, and are refused.")
@predict_inputs
@output_options
def layers(sources, label_field, model, weights, layers, pooling, folds, k, temperature, max_items, batch_size,
           out, precision, backend, text_field, image_field, id_field, device, as_json, quiet):
    """Compare a backbone's layers by k-NN and probe accuracy.

    Accuracy of k-NN and a linear probe on every layer over labelled SOURCES; recommends the layer (and
    pooling) to ingest with."""
    from ..tasks.layers import sweep_layers

    poolings = [p.strip() for p in pooling.split(",") if p.strip()] if pooling else None
    result = sweep_layers(list(sources), label_field, model=model, layers=layers, pooling=poolings, weights=weights,
                          folds=folds, k=k, temperature=temperature, out=out, batch_size=batch_size,
                          device=device, precision=precision, backend=backend, text_field=text_field,
                          image_field=image_field, id_field=id_field, max_items=max_items, progress=not quiet)
    if as_json:
        print_json(result)
        return
    click.echo(f"{result['model']}: {counted(result['n_items'], 'item')}, {counted(result['n_classes'], 'class', 'classes')}, "
               f"{result['folds']}-fold cross-validation, k={result['k']}")
    click.echo(f"  {'layer':>14} {'pooling':>8} {'dim':>5} {'k-NN acc':>9} {'k-NN F1':>8} {'probe acc':>10} "
               f"{'probe F1':>9}")
    for r in result["rows"]:
        mark = "*" if r["best"] else " "
        click.echo(f"{mark} {str(r['layer']):>14} {r['pooling']:>8} {r['dim']:>5} {r['knn_accuracy']:9.4f} "
                   f"{r['knn_macro_f1']:8.4f} {r['probe_accuracy']:10.4f} {r['probe_macro_f1']:9.4f}")
    click.echo(f"recommended: indexer ingest COLL SOURCE {result['best']['flags']}")
    for name, path in result.get("files", {}).items():
        click.echo(f"{name}: {path}")
