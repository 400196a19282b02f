"""The paper's experiments, declared: the runs once, then one spec per table and figure.

A cell is a Metric of a run (results.METRICS lists the keys).  Runs shared between
tables are the same object, so they are trained once.  Paper numbers are the ones
printed in ../shared/docs/dqrm-reference.md ("Their results").
"""
from __future__ import annotations

from .experiment import COMM, Drop, Export, Figure, Metric, NotMeasured, Row, Run, Table

PACKED = Export("packed", splits=("test", "train"))          # the model at the bits it was trained with
PTQ4 = Export("ptq4", ("--bits", "4"), splits=("test", "train"))  # vanilla post-training INT4

# --- single-rank runs: the global batch on one rank gives the parameters of N ranks (tested) ---
# Epoch checkpoints: the diagnosis applies PTQ to, and evaluates train vs test AUC of, every epoch's model.
FP32 = Run("fp32", ("--keep-epoch-checkpoints",), exports=(PACKED, PTQ4), diagnose=True)
EMB_QAT = {b: Run(f"emb{b}", ("--emb-bits", str(b), "--scale-period", "{scale_period}")) for b in (16, 8, 4)}
DQRM_FLAGS = ("--emb-bits", "4", "--mlp-bits", "4", "--mlp-scale", "channel")
DQRM4 = Run("dqrm4", DQRM_FLAGS + ("--scale-period", "{scale_period}"), exports=(PACKED,))
MLP4_MATRIX = Run("emb4-mlp4-matrix", ("--emb-bits", "4", "--mlp-bits", "4", "--mlp-scale", "tensor",
                                       "--scale-period", "{scale_period}"))
PERIOD = {p: Run(f"dqrm4-period{p}", DQRM_FLAGS + ("--scale-period", str(p))) for p in (1, 200, 500, 1000)}
FINETUNE = Run("dqrm4-finetune", DQRM4.flags + ("--pretrain-epochs", "1"))

# --- communication: DQRM INT4 on the profile's rank count, bytes measured per step ---
SPARSE = Run("sparse", DQRM4.flags, ranks=COMM)
DENSE = Run("dense", DQRM4.flags + ("--emb-exchange", "dense"), ranks=COMM, needs="--emb-exchange")
INT8 = Run("int8", DQRM4.flags + ("--emb-compress", "int8", "--mlp-compress", "int8", "--error-feedback", "mlp"),
           ranks=COMM)
EMB_GRAD = {b: Run(f"emb-grad{b}", DQRM4.flags + ("--emb-compress", f"int{b}"), ranks=COMM) for b in (16, 8, 4)}
MLP_GRAD8 = Run("mlp-grad8", DQRM4.flags + ("--mlp-compress", "int8", "--error-feedback", "none"), ranks=COMM)
NAIVE = {b: Run(f"naive{b}", DQRM4.flags + ("--emb-compress", f"int{b}", "--mlp-compress", f"int{b}",
                                           "--error-feedback", "none"), ranks=COMM) for b in (16, 8, 4)}


def acc_auc(run: Run) -> tuple[Metric, Metric]:
    return Metric(run, "best_acc"), Metric(run, "best_auc")


T1 = Table("T1", "Embedding-only QAT at INT16/INT8/INT4 vs FP32",
           ("best accuracy (%)", "best AUC", "AUC at each epoch end"),
           tuple(Row(label, (*acc_auc(run), Metric(run, "auc_per_epoch"))) for label, run in
                 (("FP32", FP32), ("INT16 embeddings", EMB_QAT[16]), ("INT8 embeddings", EMB_QAT[8]),
                  ("INT4 embeddings", EMB_QAT[4]))),
           note="Only the embedding tables are quantized (one scale per table); MLPs stay FP32.")

T2 = Table("T2", "FP32 vs vanilla PTQ INT4 vs DQRM INT4",
           ("model size (MB)", "train loss", "accuracy (%)", "AUC", "best AUC in training", "ms/iter"),
           (Row("FP32 DLRM", (Metric(FP32, "size_mb", "packed"), Metric(FP32, "packed_log_loss", "packed", "train"),
                              Metric(FP32, "packed_acc", "packed"), Metric(FP32, "packed_auc", "packed"),
                              Metric(FP32, "best_auc"), Metric(FP32, "ms_per_step")),
                paper={"kaggle": ("2161", None, "78.923", "0.8047", "0.8047", "7"),
                       "terabyte": ("12575", None, "81.165", "0.8004", "0.8004", "19")}),
            Row("vanilla PTQ INT4", (Metric(FP32, "size_mb", "ptq4"), Metric(FP32, "packed_log_loss", "ptq4", "train"),
                                     Metric(FP32, "packed_acc", "ptq4"), Metric(FP32, "packed_auc", "ptq4"),
                                     NotMeasured("PTQ is applied after training"), NotMeasured("no training")),
                paper={"kaggle": ("270", None, "76.571", "0.7675", None, None),
                       "terabyte": ("1572", None, "78.681", "0.7283", None, None)}),
            Row("DQRM INT4", (Metric(DQRM4, "size_mb", "packed"), Metric(DQRM4, "packed_log_loss", "packed", "train"),
                              Metric(DQRM4, "packed_acc", "packed"), Metric(DQRM4, "packed_auc", "packed"),
                              Metric(DQRM4, "best_auc"), Metric(DQRM4, "ms_per_step")),
                paper={"kaggle": ("270", None, "79.071", "0.8073", "0.8073", "22"),
                       "terabyte": ("1572", None, "81.210", "0.8015", "0.8015", "29")})),
           note="Size, train loss (log loss on the train split), accuracy and AUC are the final model's, "
                "evaluated from the packed file by dqrm-eval; the paper reports the best test values seen "
                "during training (next column). PTQ quantizes the final FP32 model.")

T3 = Table("T3", "Multi-node runs with 8-bit gradients: training-loss and AUC drop",
           ("train loss", "train-loss increase", "AUC", "AUC drop"),
           tuple(Row(f"{n} nodes", (Metric(INT8.at(n), "train_loss"),
                                    Drop(Metric(INT8.at(n), "train_loss"), Metric(DQRM4, "train_loss"), True),
                                    Metric(INT8.at(n), "best_auc"),
                                    Drop(Metric(INT8.at(n), "best_auc"), Metric(DQRM4, "best_auc"))))
                 for n in (2, 4, 8)),
           note="DQRM INT4 with INT8 gradients (MLP error feedback) on n ranks, against the uncompressed "
                "run with the same global batch (run on 1 rank: it ends with the parameters of n ranks).")

T4 = Table("T4", "Communication compression",
           ("MB sent/iter per rank", "comm ms/iter", "ms/iter", "accuracy (%)", "AUC"),
           tuple(Row(label, (Metric(run, "comm_mb_per_step"), Metric(run, "comm_ms_per_step"),
                             Metric(run, "ms_per_step"), *acc_auc(run)), paper=paper) for label, run, paper in
                 (("uncompressed (dense embedding gradients)", DENSE,
                   {"kaggle": ("2161", None, None, None, None), "terabyte": ("12575", None, None, None, None)}),
                  ("embedding-gradient sparsification", SPARSE,
                   {"kaggle": ("2.010", None, "61", None, None), "terabyte": ("6.756", None, None, None, None)}),
                  ("sparsification + INT8 gradients", INT8,
                   {"kaggle": ("0.509", None, "110", None, None), "terabyte": ("1.732", None, None, None, None)}))),
           note="DQRM INT4 model; bytes are measured from the tensors handed to Horovod (the paper's were "
                "computed). The paper ran 4 workers.")

T5 = Table("T5", "Periodic scale update",
           ("ms/iter", "accuracy (%)", "AUC"),
           tuple(Row(f"period {p}", (Metric(PERIOD[p], "ms_per_step"), *acc_auc(PERIOD[p])), paper=paper)
                 for p, paper in ((1, {"kaggle": ("31", None, "0.8064")}), (200, {"kaggle": ("22", None, "0.8073")}),
                                  (500, {"kaggle": ("22", None, "0.8067")}), (1000, {}))),
           note="DQRM INT4; the per-table max|W| pass runs every `period` steps.")

T6 = Table("T6", "Embedding-gradient bit width",
           ("MB sent/iter per rank", "accuracy (%)", "AUC"),
           tuple(Row(label, (Metric(run, "comm_mb_per_step"), *acc_auc(run))) for label, run in
                 (("FP32", SPARSE), ("INT16", EMB_GRAD[16]), ("INT8", EMB_GRAD[8]), ("INT4", EMB_GRAD[4]))),
           note="Sparse embedding gradients quantized (one scale per table); MLP gradients FP32.")

T7 = Table("T7", "Quantizing each part",
           ("accuracy (%)", "AUC"),
           (Row("baseline (FP32)", acc_auc(FP32), paper={"kaggle": ("78.923", "0.8047"),
                                                         "terabyte": ("81.165", "0.8004")}),
            Row("+ embeddings 4-bit", acc_auc(EMB_QAT[4])),
            Row("+ MLP 4-bit matrix-wise", acc_auc(MLP4_MATRIX)),
            Row("+ MLP 4-bit channel-wise", acc_auc(DQRM4), paper={"kaggle": ("79.071", "0.8073"),
                                                                   "terabyte": ("81.210", "0.8015")})))

T8 = Table("T8", "QAT as fine-tuning vs QAT from scratch",
           ("train loss", "accuracy (%)", "AUC"),
           (Row("1 FP32 epoch, then QAT", (Metric(FINETUNE, "train_loss"), *acc_auc(FINETUNE))),
            Row("QAT from scratch", (Metric(DQRM4, "train_loss"), *acc_auc(DQRM4)))),
           note="DQRM INT4 for the profile's epochs (the paper: 1 + 4 vs 5).")

TABLES = (T1, T2, T3, T4, T5, T6, T7, T8)

EMB_SERIES = (("FP32", FP32), ("INT16 emb", EMB_QAT[16]), ("INT8 emb", EMB_QAT[8]), ("INT4 emb", EMB_QAT[4]))
FIGURES = (
    Figure("F1a", "Test accuracy and AUC vs iterations, embedding-only QAT", EMB_SERIES, ("accuracy", "auc")),
    Figure("F1cd", "Training loss per iteration (smoothed), embedding-only QAT", EMB_SERIES, ("loss",)),
    Figure("F2a", "Test accuracy and AUC vs iterations: FP32 vs DQRM INT4",
           (("FP32", FP32), ("DQRM INT4", DQRM4)), ("accuracy", "auc")),
    Figure("F2b", "Training loss per iteration (smoothed): FP32 vs DQRM INT4",
           (("FP32", FP32), ("DQRM INT4", DQRM4)), ("loss",)),
    Figure("F8", "Table 8 as curves: QAT as fine-tuning (1 FP32 epoch, then QAT) vs QAT from scratch",
           (("FP32", FP32), ("1 FP32 epoch, then DQRM INT4", FINETUNE), ("DQRM INT4 from scratch", DQRM4)),
           ("auc", "loss"), note="DQRM INT4 (embeddings per table, MLP per channel); the fine-tuned run trains "
                                 "its first epoch in FP32."),
    Figure("F2c", "Naive gradient quantization (embedding and MLP gradients, no error compensation)",
           (("FP32 gradients", SPARSE), ("INT16", NAIVE[16]), ("INT8", NAIVE[8]), ("INT4", NAIVE[4])),
           ("auc", "loss")),
    Figure("F2d", "Embedding-only vs MLP-only INT8 gradient quantization",
           (("FP32 gradients", SPARSE), ("embedding grads INT8", EMB_GRAD[8]), ("MLP grads INT8", MLP_GRAD8),
            ("both INT8", NAIVE[8]), ("both INT8 + MLP error compensation", INT8)),
           ("auc", "loss"),
           paper={"kaggle": {"FP32 gradients": "0.8035", "embedding grads INT8": "0.8023",
                             "both INT8": "0.7974", "both INT8 + MLP error compensation": "0.8023"}},
           note="Paper AUCs: Kaggle, 4 workers."),
)
