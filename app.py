"""The Gradio demo and Hugging Face Space entry point: `python app.py [--model FOLDER_OR_HUB_ID]`.

Layout and callbacks only; what the tabs show comes from classifier.app_logic. The default model is
MODEL_ID or --model (a bundle folder or a Hub id), else the best bundle shipped in assets/models.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import NamedTuple

import gradio as gr
import pandas as pd

from classifier import app_logic as logic
from classifier.allocator import keep_freed_memory
from classifier.batching import DEFAULT_MAX_BATCH
from classifier.bundle import CONFUSION_PNG, CURVES_PNG, SAMPLES_PNG
from classifier import teach_set
from classifier.errors import BundleError, DataError, HubError, ImageError, NoFeatureMap
from classifier.serving import DEFAULT_RUNTIME, RUNTIMES, torch_importable
from classifier.teacher import TRAININGS_AT_ONCE, Teacher

MAX_FILE_SIZE = "10mb"  # a photo worth classifying is far smaller; bigger uploads are refused unread
QUEUE_SIZE = 64  # requests waiting beyond this are turned away at once instead of timing out
CONCURRENCY = 2  # callbacks of one kind run at the same time (unbatched: each gets cpu_count / CONCURRENCY threads)
TOP_K = 5
# The bars (#bars): each class's name and probability above a track filled as far as it.
# At phone width the Model tab's table gave its first column a few letters a line ("Arch / itec /
# ture"): its names keep whole words, and the values wrap instead. The example photos (#examples):
# one row of ten at desktop width, five below 1100 px, three on a phone, so each caption
# ("automobile") fits whole on its thumbnail; the gallery is as tall as its rows (no inner scrolling),
# and its columns shrink with the page instead of overflowing it (Gradio's are 100px at least).
CSS = ("#bars .bar-row { display: grid; grid-template-columns: 1fr auto; gap: 2px 8px; margin: 0 0 10px; }"
       " #bars .bar-track { grid-column: 1 / -1; height: 8px; border-radius: 4px;"
       " background: var(--background-fill-secondary); overflow: hidden; }"
       " #bars .bar-fill { display: block; height: 100%; background: var(--color-accent); }"
       " #bars .bar-value { font-variant-numeric: tabular-nums; }"
       " #model-summary :is(td, th):first-child "
       "{ min-width: 9em; word-break: normal; overflow-wrap: normal; hyphens: none; }"
       " #examples .grid-wrap { min-height: 0; max-height: none; overflow-y: visible; }"
       " #examples .grid-container { grid-template-columns: repeat(var(--grid-cols), minmax(0, 1fr)); }"
       " #examples .caption-label { max-width: calc(100% - 2 * var(--block-label-margin)); }"
       " @media (max-width: 1100px) { #examples .grid-container { grid-template-columns: repeat(5, minmax(0, 1fr)); } }"
       " @media (max-width: 640px) { #examples .grid-container { grid-template-columns: repeat(3, minmax(0, 1fr)); } }")


def _user_error(exc: Exception, title: str) -> gr.Error:
    # Expected failures (a bad upload, a missing model) need no traceback in the server log.
    return gr.Error(str(exc), title=title, print_exception=False)


def _table(headers: list[str], rows: list[list]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=headers)


class ModelView(NamedTuple):
    """Everything on the page that changes with the model, in the order of the outputs."""

    classes_note: str
    true_filter: gr.Dropdown
    predicted_filter: gr.Dropdown
    gallery: list
    mistakes_note: str
    most_confused: pd.DataFrame
    confusion: pd.DataFrame
    confusion_png: str | None
    per_class: pd.DataFrame
    summary: str
    curves: str | None
    samples: str | None


def build_app(models_dir=logic.MODELS_DIR, model_id: str | None = None,
              examples_dir=logic.EXAMPLES_DIR, runtime: str = DEFAULT_RUNTIME,
              threads: int | None = None, teach_root=None, max_batch: int = DEFAULT_MAX_BATCH) -> gr.Blocks:
    """The Blocks app, queued, with the default model loaded (so a broken default fails here, at
    start-up, with BundleError or HubError) and every other model loaded on first use.
    `teach_root`: where the Train tab writes taught models (default: teacher.ROOT, in the temp dir).
    `max_batch` over 1: predictions asked for at the same time share forward passes (classifier.batching)."""
    store = logic.ModelStore(logic.model_choices(models_dir, model_id), runtime, threads, max_batch)
    # Batched, as many predictions as one batch holds must be let in at once to meet in it; they
    # decode their images side by side, and the forward passes run one at a time in the batcher.
    predicting = {"concurrency_id": "predict", "concurrency_limit": max(CONCURRENCY, max_batch)}
    shipped = list(store.names)
    teacher = Teacher(store.add, store.remove, **({"root": teach_root} if teach_root else {}))
    if not store.choices:
        raise BundleError(f"no model bundles in {models_dir} (each one a folder with config.json); "
                          "set MODEL_ID or --model to a bundle folder or a Hub id")
    default = logic.default_model(store.choices, model_id)
    default_bundle = store.bundle(default)
    # Serve the bundles' eval images and the examples straight from disk (not copied per request).
    static = logic.servable_dirs(default_bundle.path) + [p for loc in store.choices.values()
                                                         for p in logic.servable_dirs(loc)]
    gr.set_static_paths(static + [str(examples_dir), str(teacher.root)])

    @functools.lru_cache(maxsize=64)  # a bundle's eval/ does not change while the app serves it
    def report(name: str) -> logic.EvalReport:
        return logic.EvalReport.from_bundle(store.bundle(name))

    def model_view(name: str) -> ModelView:
        try:
            bundle, evaluation = store.bundle(name), report(name)
        except (BundleError, HubError) as exc:
            raise _user_error(exc, "Cannot load this model") from exc
        filters = [logic.ALL, *bundle.label_names]
        return ModelView(
            f"The model tells apart: {', '.join(bundle.label_names)}.",
            gr.Dropdown(choices=filters, value=logic.ALL), gr.Dropdown(choices=filters, value=logic.ALL),
            evaluation.gallery(), evaluation.summary(), _table(*evaluation.most_confused_table()),
            _table(*evaluation.confusion_table()),
            evaluation.image(CONFUSION_PNG), _table(*evaluation.per_class_table()),
            logic.model_summary(bundle, store.location(name)), evaluation.image(CURVES_PNG),
            evaluation.image(SAMPLES_PNG))

    def predict(upload: dict | None, name: str):
        """Runs with preprocess=False: gr.Image's own preprocessing opens the upload with Pillow
        before our code, so a text file, an empty file or a decompression bomb would fail there
        with Pillow's message (or none). Taking the uploaded file as it came (Gradio has already
        checked that it is an upload) leaves every check, and the EXIF rotation, to
        classifier.images, the one place where untrusted images are opened."""
        if upload is None:  # the image was cleared
            return None, "", ""
        if not upload.get("path"):
            raise gr.Error("no image file arrived; upload it again", title="Cannot classify this file",
                           print_exception=False)
        try:
            prediction = logic.classify(store.get(name), upload["path"])
        except ImageError as exc:
            raise _user_error(exc, "Cannot classify this file") from exc
        except (BundleError, HubError) as exc:
            raise _user_error(exc, "Cannot load this model") from exc
        return prediction.probabilities, f"### {prediction.headline()}", prediction.timing()

    def heatmap_for(upload: dict | str | None, name: str, wanted: bool):
        """The Grad-CAM panel: hidden unless asked for, and computed only then (a forward and a
        backward pass per view, two to three times a plain prediction: docs/app.md), after the answer is shown.
        Takes the upload as it came, like predict, or a path from an API client."""
        path = upload.get("path") if isinstance(upload, dict) else upload
        if not wanted or not path:
            return gr.Image(value=None, visible=bool(wanted))
        try:
            explanation = logic.explain(store.get(name), path)
        except (ImageError, BundleError, HubError, NoFeatureMap) as exc:
            raise _user_error(exc, "Cannot show where the model looked") from exc
        return gr.Image(value=explanation.picture, label=explanation.title(), visible=True)

    def mistake_heatmap(name: str, true: str, predicted: str, evt: gr.SelectData):
        """Where the model looked when it made the clicked mistake: the evidence for the class it
        wrongly chose, on the saved thumbnail (the test image, so its preprocessing is the test's)."""
        try:
            mistake = report(name).mistake_at(int(evt.index), true, predicted)
            explanation = logic.explain(store.get(name), mistake["path"], mistake["predicted"])
        except (IndexError, ValueError, ImageError, BundleError, HubError, NoFeatureMap) as exc:
            raise _user_error(exc, "Cannot show where the model looked") from exc
        return gr.Image(value=explanation.picture, visible=True,
                        label=f"{logic.caption(mistake)}: where it looked for {mistake['predicted']} (Grad-CAM)")

    def show_mistakes(name: str, true: str, predicted: str):
        # Runs with preprocess=False: the filters' choices change with the model, and an API client
        # has no session holding the new choices, so the classes are checked here instead.
        try:
            evaluation = report(name)
            return evaluation.gallery(true, predicted), evaluation.summary(true, predicted)
        except (BundleError, HubError, ValueError) as exc:
            raise _user_error(exc, "Cannot show these mistakes") from exc

    def cell_selected(name: str, evt: gr.SelectData):
        # The row's own first cell names its true class, which stays right if the table is sorted.
        true, predicted = report(name).filters_for_cell(str((evt.row_value or [None])[0]), evt.index[1])
        return true, predicted, *show_mistakes(name, true, predicted)

    initial = model_view(default)
    with gr.Blocks(title="Image classifier", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as app:  # drop uploads older than an hour, hourly
        gr.Markdown("# Image classifier\nUpload, paste or photograph an image; the bars are "
                    "calibrated probabilities (80% means right about four times in five).")
        model = gr.Dropdown(store.names, value=default, label="Model")
        shown_model = gr.State(default)  # the model whose results the page shows
        with gr.Tab("Classify"):
            classes_note = gr.Markdown(initial.classes_note)
            with gr.Row():
                with gr.Column():
                    image = gr.Image(sources=["upload", "clipboard", "webcam"], type="filepath",
                                     image_mode=None, label="Image", height=360)
                with gr.Column():
                    # The headline carries the honest numbers (">99.9%", "Not sure: ..."); the Label's
                    # own heading would repeat the top class as if it were certain.
                    headline = gr.Markdown(elem_id="headline")
                    # The bars: app_logic.probability_bars, drawn from the hidden Label, which stays
                    # the /classify endpoint's first output (the probabilities as a dict).
                    bars = gr.HTML(elem_id="bars", label="Top classes")
                    label = gr.Label(num_top_classes=TOP_K, label="Top classes", show_heading=False, visible=False)
                    timing = gr.Markdown(elem_id="timing")
                    look = gr.Checkbox(False, label="Show where the model looked", elem_id="show-heatmap")
                    heatmap = gr.Image(label="Where the model looked (Grad-CAM)", visible=False,
                                       interactive=False, height=300, elem_id="heatmap", format="png")
            examples = logic.example_images(examples_dir)
            # The photos themselves, each captioned with its class (gr.Examples' labels would replace
            # the thumbnails); a click puts the photo into the image above and classifies it.
            example_gallery = gr.Gallery([(p, logic.example_caption(p)) for p in examples],
                                         label="Examples (click one)", elem_id="examples",
                                         columns=len(examples), height="auto", object_fit="contain",
                                         allow_preview=False, interactive=False, buttons=[],
                                         fit_columns=False) if examples else None
        with gr.Tab("Mistakes"):
            with gr.Row():
                true_filter = gr.Dropdown(initial.true_filter.choices, value=logic.ALL, label="True class",
                                          elem_id="true-filter")
                predicted_filter = gr.Dropdown(initial.predicted_filter.choices, value=logic.ALL,
                                               label="Predicted class", elem_id="predicted-filter")
            mistakes_note = gr.Markdown(initial.mistakes_note)
            gallery = gr.Gallery(initial.gallery, label="Misclassified images: true (its p) → predicted (p)",
                                 columns=5, height=480, object_fit="contain", fit_columns=False,
                                 elem_id="mistakes-gallery")
            mistake_cam = gr.Image(label="Click a mistake to see where the model looked", interactive=False,
                                   height=300, visible=False, elem_id="mistake-heatmap", format="png")
            # The pairs to look at first, without reading the whole matrix (fastai's most_confused).
            most_confused = gr.Dataframe(initial.most_confused, interactive=False, elem_id="most-confused",
                                         label="Most confused pairs")
            with gr.Row():
                confusion = gr.Dataframe(initial.confusion, interactive=False, elem_id="confusion",
                                         label="Confusion matrix (rows true, columns predicted): "
                                               "click a cell to see those mistakes")
                confusion_png = gr.Image(initial.confusion_png, label="Confusion matrix", interactive=False)
            per_class = gr.Dataframe(initial.per_class, interactive=False, label="Per-class metrics")
        with gr.Tab("Model"):
            summary = gr.Markdown(initial.summary, elem_id="model-summary")
            with gr.Row():
                curves = gr.Image(initial.curves, label="Training curves", interactive=False)
                samples = gr.Image(initial.samples, label="Test images with predictions", interactive=False)
        if torch_importable():  # training needs torch: a Space that serves ONNX alone has no Train tab
            with gr.Tab("Train"):
                train_tab(teacher, model, shipped)

        result = [label, headline, timing]

        def clear_on_failure(event):
            # A failed prediction (a bad upload) shows only its error: the previous image's result
            # and timing left beside it would read as the answer for the new file.
            event.failure(lambda: (None, "", "", ""), None, [*result, bars], api_visibility="private")
            # Drawn apart from the prediction so that the endpoint's outputs stay (label, headline,
            # timing); unqueued, it costs a short request, not a place in the queue.
            event.success(lambda probabilities: logic.probability_bars(probabilities or {}, TOP_K), label, bars,
                          queue=False, show_progress="hidden", api_visibility="private")
            event.failure(lambda: gr.Image(value=None), None, heatmap, api_visibility="private")
            # Grad-CAM only when asked, and only once the answer is on screen: the plain
            # prediction stays as fast as without it.
            event.success(heatmap_for, [image, model, look], heatmap, preprocess=False,
                          api_visibility="private")

        # One prediction per user action. Not image.change: it fires again when the front end swaps
        # the uploaded file for its server copy, so every replaced image ran the model twice. `input`
        # is the person's own upload, paste, photo or clear; an example click sets the image from the
        # server, which is no input, so it gets its own prediction after the image is set.
        clear_on_failure(image.input(predict, [image, model], result, api_name="classify",
                                     preprocess=False, trigger_mode="always_last", **predicting))
        if example_gallery is not None:
            def show_example(selected: gr.SelectData):
                return examples[selected.index]

            clear_on_failure(example_gallery.select(show_example, None, image, api_visibility="private").then(
                predict, [image, model], result, preprocess=False, api_visibility="private", **predicting))
        switch = model.change(model_view, model, [classes_note, true_filter, predicted_filter, gallery,
                                                  mistakes_note, most_confused, confusion, confusion_png,
                                                  per_class, summary, curves, samples], api_name="select_model")
        # A model that will not load leaves its error on screen and the dropdown back on the model
        # the page still shows, so the two never disagree; a good one re-classifies the image.
        clear_on_failure(switch.success(lambda name: name, model, shown_model, api_visibility="private").then(
            predict, [image, model], result, preprocess=False, api_visibility="private", **predicting))
        switch.failure(lambda previous: previous, shown_model, model, api_visibility="private")
        gr.on([true_filter.input, predicted_filter.input], show_mistakes,
              [model, true_filter, predicted_filter], [gallery, mistakes_note], api_name="mistakes",
              preprocess=False)
        look.input(heatmap_for, [image, model, look], heatmap, preprocess=False, api_name="heatmap")
        # A click on a cell updates the gallery above the table, often out of view: bring it into view.
        confusion.select(cell_selected, model, [true_filter, predicted_filter, gallery, mistakes_note],
                         api_visibility="private").then(
            None, None, None, api_visibility="private",
            js="() => document.getElementById('mistakes-gallery')?.scrollIntoView({behavior: 'smooth'})")
        gallery.select(mistake_heatmap, [model, true_filter, predicted_filter], mistake_cam, preprocess=False,
                       api_visibility="private")

    return app.queue(max_size=QUEUE_SIZE, default_concurrency_limit=CONCURRENCY)


def _set_view(images: dict, notes: list[str] | None = None):
    """The Train tab's outputs for a teaching set: the set, its table, thumbnails, classes, notes."""
    rows = teach_set.summary_rows(images)
    thumbs = [(path, name) for name, files in images.items() for path in files[-12:]][-60:]
    why = teach_set.readiness(images)
    status = "Ready to train." if why is None else f"Not ready: {why}."
    shown = "\n".join(f"- {note}" for note in (notes or [])[:20])
    more = f"\n- ... and {len(notes) - 20} more" if notes and len(notes) > 20 else ""
    left_out = f"**Left out:**\n{shown}{more}\n\n" if notes else ""
    return (images, _table(["class", "images", "status"], rows), thumbs,
            gr.Dropdown(choices=list(images), value=next(iter(images), None)), left_out + status)


def train_tab(teacher: Teacher, model: gr.Dropdown, shipped: list[str]) -> None:
    """Teach new classes from the person's own images (classifier.teach), in the current Blocks.

    The set is kept per browser session (gr.State), and so are the models it trained: they join
    that session's model menu only, and are deleted when the session ends or after
    teacher.MODEL_LIFETIME_S. Trainings share one queue (TRAININGS_AT_ONCE), whose place Gradio shows."""
    limits = teach_set.LIMITS
    gr.Markdown(f"Teach a model your own classes: name a class, add photos of it (files, the webcam, or a zip "
                f"of class folders), do the same for another class, then **Train**. It takes seconds: a "
                f"pretrained network looks at each photo once and a small layer on top learns your classes. "
                f"Up to {limits.max_classes} classes, {limits.max_images_per_class} images each.")
    images = gr.State({})
    # The names of the models this session trained; Gradio calls the callback when the session ends.
    session_models = gr.State([], delete_callback=lambda names: [teacher.forget(n) for n in names or []])
    with gr.Row():
        with gr.Column():
            class_name = gr.Textbox(label="Class name", placeholder="e.g. my mug", elem_id="teach-class")
            files = gr.File(file_count="multiple", file_types=["image"], label="Images of this class",
                            elem_id="teach-files")
            add = gr.Button("Add images to this class", elem_id="teach-add")
            with gr.Accordion("Webcam or paste, one image at a time", open=False):
                # Teachable Machine's capture: take a frame (or paste an image), add it, take the next.
                webcam = gr.Image(sources=["webcam", "clipboard"], type="filepath", label="Webcam or pasted image",
                                  height=240)
                capture = gr.Button("Add this image to the class")
            archive = gr.File(file_types=[".zip"], label="Or a zip of class folders (<class>/<image>)",
                              elem_id="teach-zip")
        with gr.Column():
            counts = gr.Dataframe(_table(["class", "images", "status"], []), interactive=False,
                                  label="Your classes", elem_id="teach-counts")
            notes = gr.Markdown(elem_id="teach-notes")
            with gr.Row():
                clear_choice = gr.Dropdown([], label="Class", scale=2)
                clear = gr.Button("Clear this class", scale=1)
            thumbs = gr.Gallery(label="Your images (latest)", columns=6, height=220, elem_id="teach-thumbs")
    train = gr.Button("Train", variant="primary", elem_id="teach-train")
    result = gr.Markdown(elem_id="teach-result")
    with gr.Row():
        longer = gr.Button("Train longer (fine-tune the whole network, minutes)", interactive=False)
        stop = gr.Button("Stop", interactive=False)
        download = gr.DownloadButton("Download the model (zip)", visible=False, elem_id="teach-download")
    with gr.Accordion("Push it to the Hugging Face Hub", open=False):
        repo = gr.Textbox(label="Repository (owner/name)")
        token = gr.Textbox(label="Your Hugging Face token (write access; used for this push only, never stored "
                                 "or shown)", type="password")
        push = gr.Button("Push")
        pushed = gr.Markdown()
    current = gr.State(None)  # the name of the model this session trained last
    view = [images, counts, thumbs, clear_choice, notes]

    def add_files(state: dict, name: str, uploaded: list | None):
        if not uploaded:
            raise gr.Error("choose some image files first", title="Nothing to add", print_exception=False)
        try:
            added = teach_set.add_images(state, name, [getattr(f, "name", f) for f in uploaded])
        except DataError as exc:
            raise _user_error(exc, "Cannot add these images") from exc
        return _set_view(added.images, added.problems)

    def add_frame(state: dict, name: str, frame: str | None):
        if not frame:
            raise gr.Error("take a photo with the webcam (or paste an image) first", title="No image",
                           print_exception=False)
        return add_files(state, name, [frame])

    def add_zip(state: dict, uploaded):
        if uploaded is None:
            return _set_view(state)
        try:
            added = teach_set.read_zip(getattr(uploaded, "name", uploaded), teacher.uploads)
            merged, problems = dict(state), list(added.problems)
            for name, paths in added.images.items():
                more = teach_set.add_images(merged, name, paths)
                merged, problems = more.images, problems + more.problems
        except DataError as exc:
            raise _user_error(exc, "Cannot read this zip") from exc
        return _set_view(merged, problems)

    def clear_class(state: dict, name: str | None):
        return _set_view(teach_set.clear_class(state, name) if name else state)

    def menu(names: list[str], value: str) -> gr.Dropdown:
        return gr.Dropdown(choices=[*shipped, *names], value=value)

    def outcome(taught, names: list[str]):
        names = [n for n in names if teacher.get(n)] + ([taught.name] if taught.name not in names else [])
        return (taught.result.summary() + f"\n\nThe model **{taught.name}** is now chosen in the menu above: the "
                "Classify, Mistakes and Model tabs show it.", menu(names, taught.name), names, taught.name,
                gr.DownloadButton(value=str(teacher.archive(taught)), visible=True), gr.Button(interactive=True))

    def run_training(state: dict, names: list[str], progress=gr.Progress()):
        try:
            taught = teacher.teach(state, lambda f, text: progress(f, desc=text))
        except (DataError, ImageError) as exc:
            raise _user_error(exc, "Cannot train yet") from exc
        return outcome(taught, names)

    def run_longer(state: dict, names: list[str], name: str | None, progress=gr.Progress()):
        taught = teacher.get(name) if name else None
        if taught is None:
            raise gr.Error("train a model first (it may have expired)", title="Nothing to train longer",
                           print_exception=False)
        try:
            longer_model = teacher.train_longer(state, taught, lambda f, text: progress(f, desc=text),
                                                should_stop=lambda: teacher.stop_requested(taught.name))
        except (DataError, ImageError) as exc:
            raise _user_error(exc, "Cannot train longer") from exc
        return outcome(longer_model, names)

    def push_model(name: str | None, repo_id: str, secret: str):
        taught = teacher.get(name) if name else None
        if taught is None:
            raise gr.Error("train a model first (it may have expired)", title="Nothing to push", print_exception=False)
        from classifier.publish import push_bundle  # the Hub upload code, only when someone pushes

        try:
            done = push_bundle(taught.bundle_dir, repo_id, token=secret or None)
        except (HubError, BundleError) as exc:
            raise _user_error(exc, "Push failed") from exc
        return f"Pushed to [{done.repo_id}]({done.url})."

    def train_from_zip(uploaded) -> tuple[str, dict]:
        """The `train` endpoint: a zip of class folders in; the taught model's name (for /classify and
        /select_model) and its validation figures out."""
        if uploaded is None:
            raise gr.Error("send a zip of class folders", title="No zip", print_exception=False)
        try:
            added = teach_set.read_zip(getattr(uploaded, "name", uploaded), teacher.uploads)
            taught = teacher.teach(added.images)
        except (DataError, ImageError) as exc:
            raise _user_error(exc, "Cannot train on this zip") from exc
        return taught.name, taught.result.figures | {"left_out": added.problems + taught.result.problems}

    add.click(add_files, [images, class_name, files], view, api_visibility="private").success(
        lambda: None, None, files, api_visibility="private")
    capture.click(add_frame, [images, class_name, webcam], view, api_visibility="private")
    archive.upload(add_zip, [images, archive], view, api_visibility="private")
    clear.click(clear_class, [images, clear_choice], view, api_visibility="private")
    trained = [result, model, session_models, current, download, longer]
    train.click(run_training, [images, session_models], trained, concurrency_limit=TRAININGS_AT_ONCE,
                concurrency_id="training", api_visibility="private")
    running = longer.click(lambda: (gr.Button(interactive=True), gr.Button(interactive=False)), None, [stop, longer],
                           api_visibility="private").then(
        run_longer, [images, session_models, current], trained, concurrency_limit=TRAININGS_AT_ONCE,
        concurrency_id="training", api_visibility="private")
    running.then(lambda: gr.Button(interactive=False), None, stop, api_visibility="private")
    stop.click(lambda name: teacher.request_stop(name), current, None, api_visibility="private")
    push.click(push_model, [current, repo, token], pushed, api_visibility="private")
    # The API's one-call training: hidden components carry its zip in and its answer out.
    api_zip, api_name, api_figures = gr.File(visible=False), gr.Textbox(visible=False), gr.JSON(visible=False)
    gr.Button(visible=False).click(train_from_zip, api_zip, [api_name, api_figures], api_name="train",
                                   concurrency_limit=TRAININGS_AT_ONCE, concurrency_id="training")


def forward_threads() -> int:
    """Threads per forward pass: the cores split between the CONCURRENCY passes that may run at once
    (unbatched predictions, or a batch beside a Grad-CAM). Batched, giving the one pass at a time
    every core was slower on 2 cores (one client's p50 146.8 against 98.6 ms, 16 clients 14.9 against
    16.3 requests/s: benchmarks/results/app_latency_cpu.md, run 2): its threads took the CPU that
    Gradio and the decoding need."""
    return max(1, (os.cpu_count() or 1) // CONCURRENCY)


def launch(app: gr.Blocks, **kwargs):
    """Launch with the limits every deployment needs; tests and benchmarks call this too."""
    return app.launch(max_file_size=MAX_FILE_SIZE, css=CSS, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("MODEL_ID"),
                        help="a bundle folder or Hub id (default: $MODEL_ID, else the best in assets/models)")
    parser.add_argument("--models-dir", default=str(logic.MODELS_DIR), help="folder of bundles for the dropdown")
    parser.add_argument("--runtime", choices=RUNTIMES, default=os.environ.get("RUNTIME", DEFAULT_RUNTIME),
                        help="torch, onnx (the bundles' model.onnx on onnxruntime) or auto: torch where installed, "
                             "else onnx (default: $RUNTIME, else auto)")
    parser.add_argument("--max-batch", type=int, default=os.environ.get("MAX_BATCH", str(DEFAULT_MAX_BATCH)),
                        help="predictions asked for at the same time share forward passes of up to this many "
                             f"images; 1 runs each alone (default: $MAX_BATCH, else {DEFAULT_MAX_BATCH})")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"threads per forward pass (default: cores / {CONCURRENCY})")
    parser.add_argument("--host", default=None, help="default: $GRADIO_SERVER_NAME or 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT or 7860")
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        parser.error(f"--max-batch must be at least 1, not {args.max_batch}")
    # Predictions reuse the memory the last one freed instead of faulting it in afresh, bounded so that
    # floods of large uploads do not grow the app (see classifier/allocator.py); before any thread starts.
    keep_freed_memory(serving=True)
    threads = args.threads or forward_threads()
    try:
        app = build_app(args.models_dir, args.model, runtime=args.runtime, threads=threads,
                        max_batch=args.max_batch)
    except (BundleError, HubError) as exc:
        sys.exit(f"app.py: cannot start: {exc}")
    if "torch" in sys.modules:  # torch's threads are process-wide; onnxruntime's were set per session
        sys.modules["torch"].set_num_threads(threads)
    launch(app, server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
