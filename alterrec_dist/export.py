"""Export a trained run for serving: the files recommend and batch_score read with --export, apart from the run.

`python -m alterrec_dist.export --run RUN_DIR --out DIR [--data DATASET] [--overwrite]` writes:

    DIR/manifest.json              format, the run (path, summary best epoch, model manifest sha256 and
                                   its file checksums), the dataset (path, sha256 of its manifest and
                                   items.parquet), the scoring spec and the engine layout, files with sha256
    DIR/items.parquet              item_idx, item_id, text, popularity, id_vec, text_vec, fused_vec
    DIR/encoders.pt                {method, model config, text_dim, max_len, states}: plain state_dicts
    DIR/tables/id_rows.npy         the learnable ID table X (V, d) float32 (what the ID encoder reads)
    DIR/tables/text_features.npy   the frozen text features F (V, D) float16 (what the text MLP reads)

`load_export(DIR)` (or `load_run(RUN_DIR)`) gives a `ScoringModel` without any torch.distributed set-up.

Scores. Per component c (AlterRec: c = id, text; NFRec: the id and text parts of its one network)
the engine scores `y_c = s_c * M_c[i] . q_c` (s = the text logit scale, 1 for id) and a kind weights
them: fused = alpha*y_id + (1-alpha)*y_text. The model serves (ranks by) one kind, `scoring.served` in the
manifest: the fused score at the alpha its run chose on validation (`fused@<a>`; `fused` at `eval.alpha`
where the run chose none). `id_vec`/`text_vec` are the M_c rows and
`fused_vec = [id_vec, text_vec]`, so the fused score is ONE inner product of `fused_vec` with
`fused_query = [w_id*s_id*q_id, w_text*s_text*q_text]` (`Queries.fused`), which is what an inner-product
index (FAISS) serves. That equals the engine's score up to float rounding only: the engine forms the
component products first and then the weighted sum. `Scoring` reproduces the engine's exact float
operations (same shapes: its shard layout, tiles and global eval batch) for exact ranks and top-N.
"""
from __future__ import annotations

import argparse

from alterrec_dist.common.cli import ArgumentParser, add_device_argument, run_cli
from alterrec_dist.common.files import check_out
from alterrec_dist.common.run_layout import served_paths
from alterrec_dist.data.dataset import dataset_files
from alterrec_dist.serve.export_dir import write_export
from alterrec_dist.serve.from_run import inference_device, load_run


# -- CLI ------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m alterrec_dist.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, metavar="RUN_DIR",
                   help="training run directory (config.toml, summary.json, model/)")
    p.add_argument("--out", required=True, metavar="EXPORT_DIR", help="export directory to write (atomically)")
    p.add_argument("--data", metavar="DATASET", help="dataset directory (default: the one the run's model names)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_device_argument(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = inference_device(args.device)
    check_out(args.out, args.overwrite, [*served_paths(args.run), *dataset_files(args.data)])  # before the model
    bundle = load_run(args.run, args.data, device)
    out = write_export(bundle, args.out, args.overwrite)
    dims = [m.shape[1] for m in bundle.matrices]
    print(f"exported {bundle.num_items} items ({bundle.method}; id_vec {dims[0]}, text_vec {dims[1]}, "
          f"fused_vec {sum(dims)}) from {args.run} (best epoch {bundle.provenance['run']['summary_best_epoch']}) "
          f"to {out}")  # on stdout, as every command's success line
    return 0


if __name__ == "__main__":
    run_cli(main)
