"""`DistillationTrainer`: a `transformers.Trainer` that adds a teacher and a distill `Objective`.

For people with an existing Hugging Face training script: swap `Trainer` for
`DistillationTrainer` and pass `teacher=` and `objective=`; everything else (TrainingArguments,
datasets, collators, callbacks, `accelerate` / `torchrun` launch) stays as it is.

    from distill import Objective
    from distill.losses.sequence import GeneralizedJSD, LMCrossEntropy
    from distill.nlp import DistillationTrainer

    trainer = DistillationTrainer(
        model=student, args=TrainingArguments("out", max_steps=1000), train_dataset=train,
        data_collator=collator, teacher=teacher_model,
        objective=Objective({"ce": LMCrossEntropy(), "jsd": GeneralizedJSD(beta=0.5)},
                            weights={"ce": 0.5, "jsd": 1.0}),
    )
    trainer.train()

The teacher is frozen, in eval mode and run without autograd (distill's `Teacher`), moved to
the student's device, and never saved. Trainable adapters of the objective (projections of
`hidden_mse`, `embed_mse`, ...) are created from a first batch before the optimizer is built and
trained in their own parameter group; they are not part of the saved student.
"""

from __future__ import annotations

from transformers import Trainer

from distill.adapters import Adapter
from distill.errors import DistillError
from distill.losses.transformer import AttentionKL, _HiddenState
from distill.nlp.adapters import hf_adapter
from distill.objective import Objective
from distill.outputs import as_batch
from distill.schedules import Progress
from distill.teachers import Teacher


def _default_adapter(objective: Objective) -> Adapter:
    terms = list(objective.terms.values())
    return hf_adapter(
        hidden_states=any(isinstance(t, _HiddenState) for t in terms),
        attentions=any(isinstance(t, AttentionKL) for t in terms),
    )


class DistillationTrainer(Trainer):
    """A `transformers.Trainer` whose loss is a distill `Objective` over student and teacher outputs.

    Args:
        teacher: a model (wrapped in a frozen `Teacher`) or a `distill.Teacher` / `CachedTeacher`.
        objective: the named, weighted loss terms; their values are logged next to `loss`.
        student_adapter / teacher_adapter: how to read `Outputs` (default: `hf_adapter`, asking
            for hidden states / attentions when a term needs them).
        *args, **kwargs: everything `transformers.Trainer` takes.
    """

    def __init__(
        self,
        *args,
        teacher=None,
        objective: Objective | None = None,
        student_adapter: Adapter | None = None,
        teacher_adapter: Adapter | None = None,
        **kwargs,
    ):
        if objective is None:
            raise DistillError("DistillationTrainer needs objective=distill.Objective({...})")
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.student_adapter = student_adapter or _default_adapter(objective)
        if teacher is None and objective.needs_teacher:
            raise DistillError(
                f"the objective's terms {', '.join(n for n, t in objective.terms.items() if t.needs_teacher)} "
                "need a teacher; pass teacher=<model>"
            )
        if teacher is not None and not callable(teacher):
            raise DistillError(f"teacher must be a model or a distill Teacher, got {type(teacher).__name__}")
        if teacher is not None and not isinstance(teacher, Teacher) and hasattr(teacher, "parameters"):
            teacher = Teacher(teacher, adapter=teacher_adapter or _default_adapter(objective))
        self.teacher = teacher
        self._objective_ready = False
        self._term_sums: dict[str, float] = {}
        self._term_count = 0
        # The objective returns a per-batch mean; let the Trainer divide by accumulation steps.
        self.model_accepts_loss_kwargs = False
        if hasattr(self, "loss_is_scaled_for_ga"):
            self.loss_is_scaled_for_ga = False

    # -- setup -------------------------------------------------------------------------------
    def _teacher_outputs(self, batch):
        if self.teacher is None or not self.objective.needs_teacher:
            return None
        if isinstance(self.teacher, Teacher) and self.teacher.device != self.args.device:
            self.teacher.to(self.args.device)
        return self.teacher(batch)

    def _setup_objective(self) -> None:
        if self._objective_ready:
            return
        self.objective.to(self.args.device)
        inputs = self._prepare_inputs(next(iter(self.get_train_dataloader())))
        batch = as_batch(inputs)
        self.model.eval()
        import torch

        with torch.no_grad():
            s_out = self.student_adapter(self.model, batch)
        self.objective.setup(s_out, self._teacher_outputs(batch), batch)
        self.model.train()
        self._objective_ready = True

    def create_optimizer(self, model=None):
        self._setup_objective()
        opt = super().create_optimizer(model) if model is not None else super().create_optimizer()
        extra = [p for p in self.objective.parameters() if p.requires_grad]
        if extra:
            opt.add_param_group({"params": extra, "weight_decay": 0.0})
        return opt

    # -- the loss ------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._objective_ready:
            self._setup_objective()
        batch = as_batch(inputs)
        student_out = self.student_adapter(model, batch)
        teacher_out = self._teacher_outputs(batch)
        if model.training:
            self.objective.update(
                Progress(
                    step=self.state.global_step,
                    total_steps=max(self.state.max_steps, 1),
                    epoch=int(self.state.epoch or 0),
                )
            )
        terms = self.objective(student_out, teacher_out, batch)
        if model.training:
            for k, v in terms.items():
                if k != "loss":
                    self._term_sums[k] = self._term_sums.get(k, 0.0) + float(v)
            self._term_count += 1
        loss = terms["loss"]
        if return_outputs:
            return loss, {"logits": student_out.logits}
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._term_count and "loss" in logs:
            for k, v in self._term_sums.items():
                logs[f"distill/{k}"] = round(v / self._term_count, 6)
            self._term_sums, self._term_count = {}, 0
        super().log(logs, *args, **kwargs)
