"""Small things the screens promise, as plain callbacks: warnings are not skips, the annotate slider counts
from 1, a step shows the editor without waiting for the maps, the image size field is text parsed by RunConfig."""
from __future__ import annotations

import gradio as gr
import pytest

from conftest import no_progress


def test_notes_are_not_listed_as_skipped_files(app):
    text = app.data.bad_files(["skipped a.png: cannot read", "brain: patient ids unknown for 3 slices"])
    assert text.startswith("**Skipped files (1)**") and "- a.png: cannot read" in text
    assert "**Notes (1)**" in text and "no file was skipped for them" in text
    only_note = app.data.bad_files(["brain: patient ids unknown for 3 slices"])
    assert "Skipped" not in only_note and only_note.startswith("No bad files.")
    assert app.data.bad_files([]) == "No bad files."


def test_annotate_slider_counts_from_one_and_a_step_leaves_the_maps(app):
    user = app.header.on_start(None)[0]
    app.data.on_restore_data(user)
    slider = app.annotate.on_images(user)
    assert slider["minimum"] == 1 and slider["value"] == 1 and slider["maximum"] >= 2
    out = app.annotate.on_annotate_show(user, 1, None, 1.0, with_review=False)
    assert "Image 2 of" in out[-1] and out[5] == []  # no run: an empty gallery (nothing to compute)


def test_image_size_text_is_parsed_and_checked_by_the_run_settings(app):
    user = app.header.on_start(None)[0]
    app.data.on_restore_data(user)
    with pytest.raises(gr.Error, match="image_size 'big'"):
        app.train.on_train(user, "efficientnet_lite0", ["patchcore"], "quick", "big", "other categories", "",
                           progress=no_progress)
    with pytest.raises(gr.Error, match="out of range"):
        app.train.on_train(user, "efficientnet_lite0", ["patchcore"], "quick", " 8 ", "other categories", "",
                           progress=no_progress)
