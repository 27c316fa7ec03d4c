"""DINO's entry in the battery: dino_loss against the paper's cross-entropy computed one image at a time, and the
center after its update (the mean of the teacher's outputs over ALL ranks): 2 ranks with half the batch each = 1
process with the whole batch.

The teacher's outputs are plain inputs here: the stop-gradient is where the paper puts it, on the teacher
(DINO.forward runs it under torch.no_grad(); tests/test_dino.py checks that), and dino_loss detaches P_t too."""
import math

import torch

from battery import MethodCase

STUDENT_T, TEACHER_T, MOMENTUM = 0.1, 0.04, 0.9
CROPS, OUTPUTS = 4, 12  # 2 global and 2 local crops


def dino_inputs():
    """Batch first, as the battery splits it: student outputs n x crops x K, teacher outputs n x 2 x K."""
    g = torch.Generator().manual_seed(0)
    return {"student": torch.randn(8, CROPS, OUTPUTS, generator=g), "teacher": torch.randn(8, 2, OUTPUTS, generator=g)}


def start_center():
    return 0.1 * torch.randn(1, OUTPUTS, generator=torch.Generator().manual_seed(1))


def dino_call(module, x):
    n = len(x["student"])
    student = x["student"].transpose(0, 1).reshape(CROPS * n, OUTPUTS)  # crop by crop, as DINO.forward
    teacher = x["teacher"].transpose(0, 1).reshape(2 * n, OUTPUTS)
    center = start_center()
    loss = module.dino_loss(student, teacher, center, STUDENT_T, TEACHER_T)
    module.update_center(center, teacher, MOMENTUM)  # after the loss, as train()
    return loss, {"center": center}


def dino_reference(x):
    """Per image i, global crop a and other crop v: H(P_t, P_s) = -sum_k P_t(t_a[i] - c)_k log P_s(s_v[i])_k with
    P_t at the teacher's temperature, P_s at the student's; the mean over v, a and i."""
    student, teacher = x["student"].double().tolist(), x["teacher"].double().tolist()
    center = start_center().double()[0].tolist()

    def softmax(row, t):
        top = max(v / t for v in row)
        e = [math.exp(v / t - top) for v in row]
        return [v / sum(e) for v in e]

    terms = []
    for i in range(len(student)):
        for a in range(2):
            p_t = softmax([v - c for v, c in zip(teacher[i][a], center)], TEACHER_T)
            for v in range(CROPS):
                if v != a:
                    terms.append(-sum(p * math.log(q) for p, q in zip(p_t, softmax(student[i][v], STUDENT_T))))
    return sum(terms) / len(terms)


CASE = MethodCase(model="DINO", inputs=dino_inputs, call=dino_call, reference=dino_reference,
                  small=["--proj_hidden_dim", "64", "--proj_dim", "32", "--num_prototypes", "30", "--num_local", "2",
                         "--local_size", "8", "--freeze_last_layer_epochs", "0.75"])
