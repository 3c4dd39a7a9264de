import pytest

from vlmtrain.data.samples import ACTION_TEXTS, build_vln_samples, decision_turns, history_indices


# Hand-computed from the InternVLA-N1 rule unique(int(linspace(0, t-1, 8))).
@pytest.mark.parametrize("t, expected", [
    (1, [0]),
    (2, [0, 1]),
    (5, [0, 1, 2, 3, 4]),
    (8, [0, 1, 2, 3, 4, 5, 6, 7]),
    (9, [0, 1, 2, 3, 4, 5, 6, 8]),
    (30, [0, 4, 8, 12, 16, 20, 24, 29]),
    (100, [0, 14, 28, 42, 56, 70, 84, 99]),
])
def test_history_indices_match_internvla_rule(t, expected):
    assert history_indices(t, 8) == expected


def test_no_history_at_first_frame_and_two_frame_history():
    assert history_indices(0) == []
    assert history_indices(7, 2) == [0, 6]


def test_decision_turns_are_the_prompt_and_the_action_text():
    user, answer = decision_turns("go to the red box", 2, 3)
    assert (user.role, answer.role) == ("user", "assistant")
    assert user.text == "<image><image> now: <image> go to the red box."
    assert answer.text == "→" == ACTION_TEXTS[3]
    custom = decision_turns(" find it ", 0, 0, template="{instruction}|{history}|{current}")
    assert custom[0].text == "find it||<image>" and custom[1].text == "STOP"


class _Episode:
    def __init__(self, length, targets, instruction):
        self.length, self.targets, self.instructions = length, targets, [instruction]


def test_vln_samples_show_history_then_current_frame_with_global_ids():
    episodes = [_Episode(3, [1, 2, 0], "a"), _Episode(2, [3, 0], "b")]
    samples = build_vln_samples(episodes, [0, 3], num_history=2)
    assert [(s.episode, s.t, s.frames, s.target) for s in samples] == [
        (0, 0, (0,), 1), (0, 1, (0, 1), 2), (0, 2, (0, 1, 2), 0),
        (1, 0, (3,), 3), (1, 1, (3, 4), 0),
    ]
