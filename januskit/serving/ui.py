"""The web UI (Gradio): chat with image upload, image generation with a gallery and progress, and image
editing (by instruction, or training-free image-to-image with a strength).

It submits to the same Engine as the HTTP API, so the UI's requests queue, batch and get refused
exactly like API requests. Mounted at /ui by `januskit serve` (and by `januskit ui`).
"""
from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from ..processing.chat import Message
from ..processing.edit import DEFAULT_CFG_IMAGE
from ..processing.image import load_image
from ..processing.tokenizer import IMAGE_TOKEN
from .engine import Engine, ImageSpec, ImageToImageSpec, Job, QueueFull
from .errors import APIError
from .specs import Source, chat_spec, check_sources, edit_spec, image_spec


def _events(engine: Engine, spec) -> Any:
    """Submit, then yield the job's events until it ends; cancel it if the caller stops early."""
    q: queue.Queue = queue.Queue()
    job = Job(spec, lambda kind, payload: q.put((kind, payload)))
    try:
        engine.submit(job)
    except QueueFull as e:
        raise gr.Error(f"Server busy ({e}); try again in a few seconds.") from None
    try:
        while True:
            try:
                kind, payload = q.get(timeout=max(1.0, engine.limits.timeout_s))
            except queue.Empty:
                raise gr.Error(f"Timed out after {engine.limits.timeout_s:g} s") from None
            if kind == "error":
                raise gr.Error(f"Generation failed: {payload}")
            yield kind, payload
            if kind == "done":
                return
    finally:
        engine.cancel(job)


def _spec_or_error(make, *args, **kw):
    try:
        return make(*args, **kw)
    except APIError as e:
        raise gr.Error(e.message) from None


def build_ui(engine: Engine, model_id: str) -> gr.Blocks:
    pipe = engine.pipe
    # The sliders of the model's own generation options are shown and sent; the others stay hidden.
    has_temperature, has_steps = "temperature" in pipe.image_options, "steps" in pipe.image_options

    def chat(message: dict, history: list, conv: list[Message], temperature: float, max_tokens: int, seed: int):
        text, files = (message.get("text") or "").strip(), message.get("files") or []
        if not text and not files:
            raise gr.Error("Type a question (and attach an image if you like).")
        images = [load_image(f if isinstance(f, str) else f["path"]) for f in files]
        # markers removed from the typed text; the images go where the model's processor puts them
        turns = conv + pipe.processor.user_turn(text.replace(IMAGE_TOKEN, ""), images)
        spec = _spec_or_error(chat_spec, engine, turns, None, max_tokens=int(max_tokens), temperature=float(temperature),
                              seed=int(seed))
        history = history + [{"role": "user", "content": {"path": f if isinstance(f, str) else f["path"]}}
                             for f in files]
        history = history + ([{"role": "user", "content": text}] if text else [])
        answer = ""
        yield history + [{"role": "assistant", "content": ""}], gr.MultimodalTextbox(value=None), conv
        for kind, payload in _events(engine, spec):
            if kind == "text":
                answer += payload
                yield history + [{"role": "assistant", "content": answer}], gr.MultimodalTextbox(value=None), conv
        conv = turns + [Message("assistant", answer)]
        yield history + [{"role": "assistant", "content": answer}], gr.MultimodalTextbox(value=None), conv

    def generate(prompt: str, n: int, seed: int, cfg_weight: float, temperature: float, steps: int,
                 progress: gr.Progress = gr.Progress()) -> list[Image.Image]:
        spec = _spec_or_error(image_spec, engine, prompt, n=int(n), seed=int(seed), cfg_weight=float(cfg_weight),
                              temperature=float(temperature) if has_temperature else None,
                              steps=int(steps) if has_steps else None)
        return run_images(spec, progress)

    def edit(sources: list | None, instruction: str, n: int, seed: int, cfg_weight: float, cfg_image: float,
             use_strength: bool, strength: float, temperature: float, steps: int,
             progress: gr.Progress = gr.Progress()) -> list[Image.Image]:
        strength_ = float(strength) if use_strength else None
        paths = [item[0] if isinstance(item, (tuple, list)) else item for item in sources or []]  # (path, caption)
        _spec_or_error(check_sources, engine, len(paths), strength_)  # before reading the files
        # gradio only stored the uploads: the API's checks, refusals named by the file's name
        sources = [Source(Path(p).name, Path(p).read_bytes()) for p in paths]
        spec = _spec_or_error(edit_spec, engine, instruction, sources, n=int(n), seed=int(seed),
                              cfg_weight=float(cfg_weight), cfg_image=None if use_strength else float(cfg_image),
                              strength=strength_, temperature=float(temperature) if has_temperature else None,
                              steps=int(steps) if has_steps else None)
        return run_images(spec, progress)

    def run_images(spec: ImageSpec | ImageToImageSpec, progress: gr.Progress) -> list[Image.Image]:
        progress(0, desc="queued")
        for kind, payload in _events(engine, spec):
            if kind == "progress":
                progress(payload[0] / payload[1], desc="generating")
            elif kind == "done":
                return payload["images"]
        return []

    with gr.Blocks(title=f"januskit: {model_id}") as ui:
        gr.Markdown(f"## januskit · `{model_id}` ({pipe.arch})")
        with gr.Tab("Chat"):
            conv = gr.State([])
            chatbot = gr.Chatbot(label="Conversation", height=360, elem_id="chatbot")
            box = gr.MultimodalTextbox(file_types=["image"], placeholder="Ask about an image (attach it with the clip)",
                                       show_label=False, elem_id="chat-input")
            with gr.Row():
                c_temp = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                c_max = gr.Slider(1, engine.limits.max_tokens, value=min(128, engine.limits.max_tokens), step=1,
                                  label="Max new tokens")
                c_seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
            clear = gr.Button("New conversation")
            box.submit(chat, [box, chatbot, conv, c_temp, c_max, c_seed], [chatbot, box, conv])
            clear.click(lambda: ([], None, []), None, [chatbot, box, conv])
        with gr.Tab("Generate"):
            prompt = gr.Textbox(label="Prompt", elem_id="gen-prompt",
                                placeholder="a red circle to the left of a blue square")
            with gr.Row():
                n = gr.Slider(1, engine.limits.max_n, value=min(4, engine.limits.max_n), step=1, label="Images")
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                cfg_weight = gr.Slider(0.0, 10.0, value=pipe.default_cfg_weight, step=0.5, label="CFG weight")
                temperature = gr.Slider(0.05, 2.0, value=pipe.image_options.get("temperature", 1.0), step=0.05,
                                        label="Temperature", visible=has_temperature)
                steps = gr.Slider(1, 100, value=pipe.image_options.get("steps", 30), step=1, label="Euler steps",
                                  visible=has_steps)
            go = gr.Button("Generate", variant="primary", elem_id="gen-button")
            gallery = gr.Gallery(label="Images", columns=4, height=320, elem_id="gallery", format="png")
            go.click(generate, [prompt, n, seed, cfg_weight, temperature, steps], gallery)
            prompt.submit(generate, [prompt, n, seed, cfg_weight, temperature, steps], gallery)
        with gr.Tab("Edit"):
            with gr.Row():
                # A gallery keeps the upload a file path (gr.Image would decode it before load_image's checks)
                # and takes several sources.
                e_sources = gr.Gallery(label=f"Source images (up to {engine.limits.max_images_per_request})",
                                       type="filepath", interactive=True, file_types=["image"], columns=4, height=240,
                                       format="png", elem_id="edit-sources")
                e_gallery = gr.Gallery(label="Edited images", columns=4, height=240, elem_id="edit-gallery",
                                       format="png")
            instruction = gr.Textbox(label="Instruction (with strength: the prompt of the new image)",
                                     elem_id="edit-instruction", placeholder="make the circle green")
            with gr.Row():
                e_n = gr.Slider(1, engine.limits.max_n, value=min(2, engine.limits.max_n), step=1, label="Images")
                e_seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                e_cfg = gr.Slider(0.0, 10.0, value=pipe.default_cfg_weight, step=0.5, label="CFG weight (text)")
                e_cfg_image = gr.Slider(0.0, 10.0, value=DEFAULT_CFG_IMAGE, step=0.1, label="CFG weight (image)")
            with gr.Row():
                use_strength = gr.Checkbox(value=False, label="Training-free image-to-image (strength)",
                                           elem_id="edit-use-strength")
                strength = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="Strength (1 = nothing of the source kept)")
                e_temperature = gr.Slider(0.05, 2.0, value=pipe.image_options.get("temperature", 1.0), step=0.05,
                                          label="Temperature", visible=has_temperature)
                e_steps = gr.Slider(1, 100, value=pipe.image_options.get("steps", 30), step=1, label="Euler steps",
                                    visible=has_steps)
            e_go = gr.Button("Edit", variant="primary", elem_id="edit-button")
            inputs = [e_sources, instruction, e_n, e_seed, e_cfg, e_cfg_image, use_strength, strength, e_temperature,
                      e_steps]
            e_go.click(edit, inputs, e_gallery)
            instruction.submit(edit, inputs, e_gallery)
    return ui
