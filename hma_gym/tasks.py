"""Task success predicates on robomimic's `object` observation, shared by the ground-truth and learned envs.

robomimic records each task's object state under the low-dim key `object` (robosuite's `object-state`
sensor group). For Lift it is 10 numbers: the cube position (3, world frame, metres), the cube
quaternion (4, xyzw) and the gripper-to-cube vector (3). The ground-truth env scores an episode by
applying the predicate below to its true object state; the learned env applies the same function to
the object state its world model predicts, so the two verdicts differ only where the states differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OBJECT_KEY = "object"


@dataclass(frozen=True)
class ObjectTask:
    """A task whose success is a function of its `object` observation alone."""

    name: str
    object_dim: int
    """Width of the `object` observation."""
    fields: tuple[tuple[str, int], ...]
    """(name, width) of the object state's parts, in order."""
    table_height: float
    """Height of the table top in the world frame (m): robosuite's arena `table_offset[2]`."""
    lift_margin: float
    """The cube counts as lifted when its centre is more than this above the table top (m)."""
    pose_fields: tuple[str, ...] = ("cube_pos", "cube_quat")
    """The object's own pose: it stays exactly put unless something moves it (`StateModel`'s contact gate)."""
    position_field: str = "cube_pos"
    """The object's position: its change marks a contact step in the data."""
    differences: tuple[tuple[str, str, str], ...] = ()
    """(target, a, b): field target = a - b, each an object field or another observation key (e.g.
    robomimic's gripper-to-cube vector = cube position - end-effector position)."""

    def field_offset(self, name: str) -> tuple[int, int]:
        """(offset, width) of field `name` in the object state."""
        start = 0
        for field_name, width in self.fields:
            if field_name == name:
                return start, width
            start += width
        raise KeyError(f"{self.name} object state has no field {name!r}; it has {[f for f, _ in self.fields]}")

    def field(self, object_state: np.ndarray, name: str) -> np.ndarray:
        """One part of a batch (..., object_dim) of object states, e.g. `cube_pos`."""
        start, width = self.field_offset(name)
        return np.asarray(object_state)[..., start:start + width]

    def success(self, object_state: np.ndarray) -> np.ndarray:
        """Success of each object state of a batch (..., object_dim) -> bool array (...)."""
        state = np.asarray(object_state, dtype=np.float64)
        if state.shape[-1:] != (self.object_dim,):
            raise ValueError(f"{self.name} object state must end in ({self.object_dim},), got {state.shape}")
        return self.field(state, "cube_pos")[..., 2] > self.table_height + self.lift_margin


# robosuite 1.5.2 Lift: TableArena(table_offset=(0, 0, 0.8)); `_check_success` is
# cube_height > table_height + 0.04 (a 4 cm margin on the cube centre, which rests ~2 cm above the table).
_LIFT_TABLE, _LIFT_MARGIN = 0.8, 0.04
LIFT = ObjectTask(
    name="Lift",
    object_dim=10,
    fields=(("cube_pos", 3), ("cube_quat", 4), ("gripper_to_cube_pos", 3)),
    table_height=_LIFT_TABLE,
    lift_margin=_LIFT_MARGIN,
    differences=(("gripper_to_cube_pos", "cube_pos", "robot0_eef_pos"),),
)

OBJECT_TASKS: dict[str, ObjectTask] = {"Lift": LIFT}


def object_task(task: str) -> ObjectTask | None:
    """The object-state predicate of a robosuite task name, or None where the project has none (Stack)."""
    return OBJECT_TASKS.get(task)


def task_success(task: str, object_state: np.ndarray) -> np.ndarray:
    """`object_task(task).success(object_state)`, with a clear error for tasks that have no predicate."""
    spec = object_task(task)
    if spec is None:
        raise ValueError(f"task {task!r} has no object-state success predicate; known: {sorted(OBJECT_TASKS)}")
    return spec.success(object_state)
