"""Task sequences as configuration: a suite name (or a list of Meta-World env names) -> the env names,
their English instructions and the simulator family.

Meta-World suites (demonstrations made by the scripted experts, `lifelong make-demos`):

- `cw10`: the Continual World sequence, ten v3 tasks in its order.
- `cw3`: three CW10 tasks the scripted expert solves every time, in few steps, and a small BC policy
  learns fast (window-close, faucet-close, handle-press-side): the short suite for demos and CPU runs.
- `mt10`: Meta-World's MT10 tasks in the benchmark's order.

LIBERO suites (`libero_spatial`, `libero_object`, `libero_goal`, `libero_10`): task names are the bddl
names, files `<root>/<suite>/<task name>_demo.hdf5` as LIBERO's download lays them out; the instruction is
the task name with underscores as spaces, without the scene prefix (`KITCHEN_SCENE3_`) of LIBERO-10.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cli.errors import ConfigError

#: a short English instruction per Meta-World task (the "-v3" suffix left out)
METAWORLD_INSTRUCTIONS = {
    "assembly": "put the ring on the peg",
    "basketball": "put the ball in the basket",
    "bin-picking": "move the puck from one bin to the other",
    "box-close": "put the lid on the box",
    "button-press-topdown": "press the button from above",
    "button-press-topdown-wall": "press the button from above behind the wall",
    "button-press": "press the button",
    "button-press-wall": "press the button behind the wall",
    "coffee-button": "press the button of the coffee machine",
    "coffee-pull": "pull the mug away from the coffee machine",
    "coffee-push": "push the mug under the coffee machine",
    "dial-turn": "turn the dial",
    "disassemble": "take the ring off the peg",
    "door-close": "close the door",
    "door-lock": "lock the door",
    "door-open": "open the door",
    "door-unlock": "unlock the door",
    "drawer-close": "close the drawer",
    "drawer-open": "open the drawer",
    "faucet-close": "turn the faucet off",
    "faucet-open": "turn the faucet on",
    "hammer": "hammer the nail into the wall",
    "hand-insert": "move the puck into the hole",
    "handle-press-side": "press the handle down from the side",
    "handle-press": "press the handle down",
    "handle-pull": "pull the handle up",
    "handle-pull-side": "pull the handle up from the side",
    "lever-pull": "pull the lever up",
    "peg-insert-side": "insert the peg into the hole from the side",
    "peg-unplug-side": "unplug the peg from the side",
    "pick-out-of-hole": "pick the puck out of the hole",
    "pick-place": "pick up the puck and place it at the goal",
    "pick-place-wall": "pick up the puck and place it at the goal behind the wall",
    "plate-slide": "slide the plate into the goal",
    "plate-slide-side": "slide the plate into the goal from the side",
    "plate-slide-back": "slide the plate back out of the goal",
    "plate-slide-back-side": "slide the plate back out of the goal to the side",
    "push": "push the puck to the goal",
    "push-back": "pull the puck back to the goal",
    "push-wall": "push the puck past the wall to the goal",
    "reach": "reach the goal",
    "reach-wall": "reach the goal behind the wall",
    "shelf-place": "put the puck on the shelf",
    "soccer": "kick the ball into the net",
    "stick-pull": "pull the container with the stick",
    "stick-push": "push the container with the stick",
    "sweep": "sweep the puck off the table",
    "sweep-into": "sweep the puck into the hole",
    "window-close": "close the window",
    "window-open": "open the window",
}

_V3 = "-v3"
METAWORLD_SUITES = {
    "cw10": (
        "hammer",
        "push-wall",
        "faucet-close",
        "push-back",
        "stick-pull",
        "handle-press-side",
        "push",
        "shelf-place",
        "window-close",
        "peg-unplug-side",
    ),
    "cw3": ("window-close", "faucet-close", "handle-press-side"),
    "mt10": (
        "reach",
        "push",
        "pick-place",
        "door-open",
        "drawer-open",
        "drawer-close",
        "button-press-topdown",
        "peg-insert-side",
        "window-open",
        "window-close",
    ),
}

LIBERO_SUITES = {
    "libero_spatial": tuple(
        f"pick_up_the_black_bowl_{where}_and_place_it_on_the_plate"
        for where in (
            "between_the_plate_and_the_ramekin",
            "next_to_the_ramekin",
            "from_table_center",
            "on_the_cookie_box",
            "in_the_top_drawer_of_the_wooden_cabinet",
            "on_the_ramekin",
            "next_to_the_cookie_box",
            "on_the_stove",
            "next_to_the_plate",
            "on_the_wooden_cabinet",
        )
    ),
    "libero_object": tuple(
        f"pick_up_the_{thing}_and_place_it_in_the_basket"
        for thing in (
            "alphabet_soup",
            "cream_cheese",
            "salad_dressing",
            "bbq_sauce",
            "ketchup",
            "tomato_sauce",
            "butter",
            "milk",
            "chocolate_pudding",
            "orange_juice",
        )
    ),
    "libero_goal": (
        "open_the_middle_drawer_of_the_cabinet",
        "put_the_bowl_on_the_stove",
        "put_the_wine_bottle_on_top_of_the_cabinet",
        "open_the_top_drawer_and_put_the_bowl_inside",
        "put_the_bowl_on_top_of_the_cabinet",
        "push_the_plate_to_the_front_of_the_stove",
        "put_the_cream_cheese_in_the_bowl",
        "turn_on_the_stove",
        "put_the_bowl_on_the_plate",
        "put_the_wine_bottle_on_the_rack",
    ),
    "libero_10": (
        "LIVING_ROOM_SCENE2_put_both_the_alphabet_soup_and_the_tomato_sauce_in_the_basket",
        "LIVING_ROOM_SCENE2_put_both_the_cream_cheese_box_and_the_butter_in_the_basket",
        "KITCHEN_SCENE3_turn_on_the_stove_and_put_the_moka_pot_on_it",
        "KITCHEN_SCENE4_put_the_black_bowl_in_the_bottom_drawer_of_the_cabinet_and_close_it",
        "LIVING_ROOM_SCENE5_put_the_white_mug_on_the_left_plate_and_put_the_yellow_and_white_mug_on_the_right_plate",
        "STUDY_SCENE1_pick_up_the_book_and_place_it_in_the_back_compartment_of_the_caddy",
        "LIVING_ROOM_SCENE6_put_the_white_mug_on_the_plate_and_put_the_chocolate_pudding_to_the_right_of_the_plate",
        "LIVING_ROOM_SCENE1_put_both_the_alphabet_soup_and_the_cream_cheese_box_in_the_basket",
        "KITCHEN_SCENE8_put_both_moka_pots_on_the_stove",
        "KITCHEN_SCENE6_put_the_yellow_and_white_mug_in_the_microwave_and_close_it",
    ),
}

SUITE_NAMES = (*METAWORLD_SUITES, *LIBERO_SUITES)
#: the observation keys a policy reads by default: low-dim state, then the cameras when images are on
LOWDIM_KEYS = {
    "metaworld": ("ee_states", "gripper_states", "object_states", "goal_states"),
    "libero": ("joint_states", "gripper_states"),
}
CAMERA_KEYS = {"metaworld": ("corner_rgb",), "libero": ("agentview_rgb", "eye_in_hand_rgb")}
_SCENE = re.compile(r"^[A-Z_]+SCENE\d+_")


@dataclass(frozen=True)
class Suite:
    """A resolved task sequence: `name` is the suite name ("custom" for a list of env names), `kind` the
    simulator family ("metaworld" or "libero"), then one env name and one instruction per task."""

    name: str
    kind: str
    env_names: tuple[str, ...]
    instructions: tuple[str, ...]

    def demo_file(self, root: str | Path, task_id: int) -> Path:
        """Where task `task_id`'s demonstrations are: `<root>/<env>.hdf5` (Meta-World, as `make-demos`
        writes them) or `<root>/<suite>/<task>_demo.hdf5` (LIBERO's layout)."""
        name = self.env_names[task_id]
        if self.kind == "libero":
            return Path(root) / self.name / f"{name}_demo.hdf5"
        return Path(root) / f"{name}.hdf5"

    @property
    def num_tasks(self) -> int:
        return len(self.env_names)


def libero_instruction(task_name: str) -> str:
    """LIBERO's instruction of a task: its name without the scene prefix, underscores as spaces."""
    return _SCENE.sub("", task_name).replace("_", " ")


def metaworld_instruction(env_name: str, option: str = "data.tasks") -> str:
    """The instruction of a Meta-World v3 env name (`window-close-v3` -> "close the window"); `option` names
    where the name came from in an error."""
    base = env_name.removesuffix(_V3)
    if not env_name.endswith(_V3) or base not in METAWORLD_INSTRUCTIONS:
        hint = f"; did you mean {base}{_V3}?" if base in METAWORLD_INSTRUCTIONS else ""
        raise ConfigError(
            f"{option}: {env_name!r} is not a Meta-World v3 task (names like reach-v3, push-v3, "
            f"window-close-v3; see metaworld.MT1.ENV_NAMES){hint}"
        )
    return METAWORLD_INSTRUCTIONS[base]


def resolve_suite(
    suite: str | None = None,
    tasks: list[str] | tuple[str, ...] | None = None,
    options: tuple[str, str] = ("data.suite", "data.tasks"),
) -> Suite:
    """The suite named `suite`, or a custom sequence of Meta-World env names `tasks` (exactly one of the two);
    `options` name the two settings in errors (`--suite` / `--tasks` for make-demos)."""
    suite_option, tasks_option = options
    if (suite is None) == (tasks is None):
        raise ConfigError(
            f"give exactly one of {suite_option} (one of {', '.join(SUITE_NAMES)}) or {tasks_option} (Meta-World "
            "env names)"
        )
    if tasks is not None:
        names = tuple(tasks)
        if not names:
            raise ConfigError(f"{tasks_option} is empty: list Meta-World env names, e.g. [reach-v3, push-v3]")
        if len(set(names)) != len(names):
            raise ConfigError(f"{tasks_option} lists a task twice: {list(names)}")
        return Suite("custom", "metaworld", names, tuple(metaworld_instruction(n, tasks_option) for n in names))
    if suite in METAWORLD_SUITES:
        names = tuple(n + _V3 for n in METAWORLD_SUITES[suite])
        return Suite(suite, "metaworld", names, tuple(metaworld_instruction(n) for n in names))
    if suite in LIBERO_SUITES:
        names = LIBERO_SUITES[suite]
        return Suite(suite, "libero", names, tuple(libero_instruction(n) for n in names))
    raise ConfigError(f"{suite_option}: unknown suite {suite!r}; valid suites are {', '.join(SUITE_NAMES)}")
