#!/usr/bin/python3
"""desktop-server: the cua template's desktop-control service (X display :1).

Run by the guest agent as the template service `desktop-api`; the control plane reaches it
through the sandbox's port 6090 (sandboxd/controlplane/desktop.py) and is its only client.
Standard-library HTTP (ThreadingTCPServer, Nagle off, no reverse DNS lookups); the X
server is read through python3-xlib (screenshots, cursor, windows) and driven with xdotool
(pointer and keyboard). Screen parsing is RapidOCR (ONNX models inside its wheel) plus
OpenCV box detection, or OmniParser's icon detector when the operator mounted its weights
at /opt/omniparser. Nothing here ever downloads anything.

Every request but GET /health needs the header `X-Desktop-Token: <api_token>`; the token and the
interactive VNC password are made at first start in /run/sandboxd-desktop (root only), where
the control plane reads them through the guest agent: a sandbox access token, which opens
the sandbox's ports, is not enough to drive the desktop or the interactive live view.

Errors: {"error": {"code", "message", "field"}} with 400/404/409/413/500.
"""

import argparse
import hmac
import json
import os
import re
import secrets
import socket
import socketserver
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

SECRETS_DIR = "/run/sandboxd-desktop"
SECRETS_FILE = SECRETS_DIR + "/secrets.json"
VNC_PASSWORD_FILE = SECRETS_DIR + "/vnc.passwd"  # x11vnc -passwdfile: the first line
OMNIPARSER_DIR = "/opt/omniparser"
OMNIPARSER_MODEL = "icon_detect/model.onnx"
MAX_BODY = 1024 * 1024
XDOTOOL_TIMEOUT = 30.0
BUTTONS = {"left": 1, "middle": 2, "right": 3}
SCROLL_BUTTONS = {"up": 4, "down": 5, "left": 6, "right": 7}
MODIFIERS = {"ctrl": "ctrl", "control": "ctrl", "alt": "alt", "shift": "shift", "super": "super",
             "win": "super", "cmd": "super", "meta": "super", "command": "super", "option": "alt"}
KEY_ALIASES = {
    "enter": "Return", "return": "Return", "esc": "Escape", "escape": "Escape", "tab": "Tab",
    "space": "space", "backspace": "BackSpace", "delete": "Delete", "del": "Delete", "insert": "Insert",
    "home": "Home", "end": "End", "pageup": "Prior", "page_up": "Prior", "pgup": "Prior", "pagedown": "Next",
    "page_down": "Next", "pgdn": "Next", "up": "Up", "down": "Down", "left": "Left", "right": "Right",
    "capslock": "Caps_Lock", "caps_lock": "Caps_Lock", "menu": "Menu", "printscreen": "Print", "print": "Print",
    "plus": "plus", "minus": "minus",
}
KEY_ALIASES.update({"f%d" % i: "F%d" % i for i in range(1, 25)})


class ApiError(Exception):
    def __init__(self, status, code, message, field=None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


def bad(field, message, code="invalid_value"):
    return ApiError(400, code, "%s: %s" % (field, message), field)


# --- secrets ------------------------------------------------------------------------------

def write_private(path, text):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_secrets():
    """The API token and the VNC password, made once per sandbox (kept across restarts of
    this service, so the control plane's cached copy stays right)."""
    os.makedirs(SECRETS_DIR, mode=0o700, exist_ok=True)
    try:
        with open(SECRETS_FILE) as f:
            data = json.load(f)
    except (OSError, ValueError):
        alphabet = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
        data = {"api_token": secrets.token_urlsafe(32),
                # VNC authentication uses only the first 8 characters of a password
                "vnc_password": "".join(secrets.choice(alphabet) for _ in range(8))}
        write_private(SECRETS_FILE, json.dumps(data))
    write_private(VNC_PASSWORD_FILE, data["vnc_password"] + "\n")
    return data


# --- X display ----------------------------------------------------------------------------

class Display:
    """One python-xlib connection, used under a lock."""

    def __init__(self):
        from Xlib import XK, X, display
        from Xlib.error import BadWindow, XError

        self.X, self.XK, self.BadWindow, self.XError = X, XK, BadWindow, XError
        self.lock = threading.Lock()
        self.d = display.Display(os.environ.get("DISPLAY", ":1"))
        self.screen = self.d.screen()
        self.root = self.screen.root
        self.atoms = {name: self.d.intern_atom(name) for name in (
            "_NET_CLIENT_LIST", "_NET_ACTIVE_WINDOW", "_NET_WM_NAME", "UTF8_STRING", "_NET_WM_PID",
            "_NET_WM_WINDOW_TYPE", "_NET_WM_WINDOW_TYPE_NORMAL", "_NET_WM_STATE", "_NET_WM_STATE_HIDDEN")}
        self.latin1_names = {}
        for name in dir(XK):
            if name.startswith("XK_"):
                value = getattr(XK, name)
                if isinstance(value, int) and 0x20 < value < 0x100:
                    self.latin1_names.setdefault(chr(value), name[3:])

    def size(self):
        return self.screen.width_in_pixels, self.screen.height_in_pixels

    def depth(self):
        return self.screen.root_depth

    def capture(self, x, y, w, h):
        """BGR pixels of a region as a numpy array (h, w, 3)."""
        import numpy as np

        with self.lock:
            image = self.root.get_image(x, y, w, h, self.X.ZPixmap, 0xFFFFFFFF)
        # depth 24 in 32 bits per pixel, least significant byte first: B, G, R, unused
        return np.frombuffer(image.data, dtype=np.uint8).reshape(h, w, 4)[:, :, :3]

    def cursor(self):
        with self.lock:
            p = self.root.query_pointer()
        return p.root_x, p.root_y

    def _prop(self, window, name, kind):
        prop = window.get_full_property(self.atoms[name], kind)
        return prop.value if prop is not None else None

    def active_window(self):
        with self.lock:
            value = self._prop(self.root, "_NET_ACTIVE_WINDOW", self.X.AnyPropertyType)
        return int(value[0]) if value is not None and len(value) and value[0] else None

    def windows(self):
        out = []
        with self.lock:
            ids = self._prop(self.root, "_NET_CLIENT_LIST", self.X.AnyPropertyType)
            active = self._prop(self.root, "_NET_ACTIVE_WINDOW", self.X.AnyPropertyType)
            active = int(active[0]) if active is not None and len(active) else None
            for wid in ids if ids is not None else ():
                w = self.d.create_resource_object("window", int(wid))
                try:
                    name = self._prop(w, "_NET_WM_NAME", self.atoms["UTF8_STRING"])
                    if isinstance(name, bytes):
                        name = name.decode("utf-8", "replace")
                    title = name if name is not None else (w.get_wm_name() or "")
                    cls = w.get_wm_class()
                    pid = self._prop(w, "_NET_WM_PID", self.X.AnyPropertyType)
                    state = self._prop(w, "_NET_WM_STATE", self.X.AnyPropertyType)
                    geometry = w.get_geometry()
                    origin = self.root.translate_coords(w, 0, 0)
                    attrs = w.get_attributes()
                except (self.BadWindow, self.XError):  # gone meanwhile
                    continue
                hidden = state is not None and self.atoms["_NET_WM_STATE_HIDDEN"] in list(state)
                out.append({
                    "id": int(wid),
                    "title": title if isinstance(title, str) else title.decode("latin-1"),
                    "class": cls[1] if cls else None,
                    "pid": int(pid[0]) if pid is not None and len(pid) else None,
                    "x": origin.x, "y": origin.y, "width": geometry.width, "height": geometry.height,
                    "visible": attrs.map_state == self.X.IsViewable and not hidden,
                    "focused": int(wid) == active,
                })
        return out

    def keysym_valid(self, name):
        return self.XK.string_to_keysym(name) != 0

    def map_characters(self, text):
        """Give characters the keymap lacks (é, €, ä, ...) spare keycodes of their own, and
        leave them there. xdotool would map each one for a moment and undo it right after
        the keystroke, before a client like Chromium has read the event: it then sees a key
        without a character."""
        wanted = {ord(c) if 0x20 <= ord(c) <= 0xFF else 0x1000000 + ord(c)
                  for c in text if ord(c) >= 0x20 and c != "\x7f"}
        with self.lock:
            first = self.d.display.info.min_keycode
            rows = self.d.get_keyboard_mapping(first, self.d.display.info.max_keycode - first + 1)
            present = {keysym for row in rows for keysym in row if keysym}
            spare = [first + i for i, row in enumerate(rows) if not any(row)]
            missing = sorted(wanted - present)
            for keysym in missing[:len(spare)]:
                self.d.change_keyboard_mapping(spare.pop(), [(keysym, keysym)])
            if missing:
                self.d.sync()
        if missing:
            time.sleep(0.05)  # clients apply the MappingNotify before the keystrokes arrive


# --- input (xdotool) ----------------------------------------------------------------------

def xdotool(*args):
    try:
        done = subprocess.run(["xdotool", *[str(a) for a in args]], capture_output=True, text=True,
                              timeout=XDOTOOL_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ApiError(500, "input_failed", "xdotool did not finish in %gs" % XDOTOOL_TIMEOUT) from None
    if done.returncode != 0:
        raise ApiError(500, "input_failed", "xdotool failed: %s" % (done.stderr.strip()[-500:] or done.returncode))
    return done.stdout


def presses(button, times, gap):
    """xdotool arguments for `times` presses of a button, `gap` seconds apart. (`xdotool
    click` holds each one ~100 ms; down and up with a 10 ms hold are what a user does.)"""
    args = []
    for i in range(times):
        args += (["sleep", gap] if i else []) + ["mousedown", button, "sleep", 0.01, "mouseup", button]
    return args


class Desktop:
    def __init__(self, display):
        self.display = display
        self.input_lock = threading.Lock()  # one gesture at a time: a drag is not interleaved with a click

    # checks

    def point(self, body, xf="x", yf="y", required=True):
        if body.get(xf) is None and body.get(yf) is None and not required:
            return None
        w, h = self.display.size()
        out = []
        for field, limit in ((xf, w), (yf, h)):
            v = body.get(field)
            if v is None:
                raise bad(field, "required", "missing_field")
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(field, "must be an integer", "invalid_type")
            if not 0 <= v < limit:
                raise bad(field, "%d is off the screen (%dx%d)" % (v, w, h), "off_screen")
            out.append(v)
        return out

    def pair(self, body, field):
        v = body.get(field)
        if not (isinstance(v, list) and len(v) == 2):
            raise bad(field, "must be [x, y]", "invalid_type" if v is not None else "missing_field")
        return self.point({field + "[0]": v[0], field + "[1]": v[1]}, field + "[0]", field + "[1]")

    @staticmethod
    def choice(body, field, options, default):
        v = body.get(field, default)
        if v not in options:
            raise bad(field, "must be one of %s" % ", ".join(sorted(options)))
        return v

    @staticmethod
    def integer(body, field, default, lo, hi):
        v = body.get(field, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise bad(field, "must be an integer from %d to %d" % (lo, hi))
        return v

    def key_combo(self, combo, field):
        """'ctrl+shift+t' -> 'ctrl+shift+t' in xdotool's names, each key checked."""
        if not isinstance(combo, str) or not combo.strip():
            raise bad(field, "must be a non-empty string such as \"ctrl+l\"", "invalid_type")
        parts = combo.split("+") if combo != "+" else ["plus"]
        if "" in parts:  # "ctrl++" means ctrl and the plus key
            parts = [p for p in parts if p] + ["plus"]
        names = []
        for part in parts:
            low = part.strip().lower()
            if low in MODIFIERS:
                names.append(MODIFIERS[low])
            elif low in KEY_ALIASES:
                names.append(KEY_ALIASES[low])
            elif len(part) == 1 and part.isalnum() and part.isascii():
                names.append(part)
            elif len(part) == 1 and part in self.display.latin1_names:
                names.append(self.display.latin1_names[part])
            elif self.display.keysym_valid(part.strip()):
                names.append(part.strip())
            else:
                raise bad(field, "unknown key %r (X keysym names such as Return, Escape, F5, a, "
                                 "or aliases such as enter, esc, ctrl, pageup)" % part, "unknown_key")
        return "+".join(names)

    # actions

    def move(self, body):
        x, y = self.point(body)
        with self.input_lock:
            xdotool("mousemove", x, y)
        return {"x": x, "y": y}

    def click(self, body):
        at = self.point(body, required=False)
        button = BUTTONS[self.choice(body, "button", BUTTONS, "left")]
        double = body.get("double", False)
        if not isinstance(double, bool):
            raise bad("double", "must be true or false", "invalid_type")
        clicks = self.integer(body, "clicks", 2 if double else 1, 1, 3)
        args = ["mousemove", at[0], at[1]] if at else []
        args += presses(button, clicks, 0.08)
        with self.input_lock:
            xdotool(*args)
        x, y = self.display.cursor()
        return {"x": x, "y": y, "button": body.get("button", "left"), "clicks": clicks}

    def press_button(self, body, down):
        at = self.point(body, required=False)
        button = BUTTONS[self.choice(body, "button", BUTTONS, "left")]
        args = ["mousemove", at[0], at[1]] if at else []
        with self.input_lock:
            xdotool(*args, "mousedown" if down else "mouseup", button)
        x, y = self.display.cursor()
        return {"x": x, "y": y}

    def drag(self, body):
        x1, y1 = self.pair(body, "from")
        x2, y2 = self.pair(body, "to")
        button = BUTTONS[self.choice(body, "button", BUTTONS, "left")]
        steps = 8  # intermediate motion: pages and window managers track the drag, not only its ends
        path = []
        for i in range(1, steps + 1):
            path += ["mousemove", round(x1 + (x2 - x1) * i / steps), round(y1 + (y2 - y1) * i / steps), "sleep", 0.02]
        with self.input_lock:
            xdotool("mousemove", x1, y1, "sleep", 0.05, "mousedown", button, "sleep", 0.05, *path,
                    "sleep", 0.05, "mouseup", button)
        return {"from": [x1, y1], "to": [x2, y2]}

    def scroll(self, body):
        direction = self.choice(body, "direction", SCROLL_BUTTONS, "down")
        amount = self.integer(body, "amount", 3, 1, 100)
        at = self.point(body, required=False)
        args = ["mousemove", at[0], at[1]] if at else []
        with self.input_lock:
            xdotool(*args, *presses(SCROLL_BUTTONS[direction], amount, 0.02))
        return {"direction": direction, "amount": amount}

    def type_text(self, body):
        text = body.get("text")
        if not isinstance(text, str) or text == "":
            raise bad("text", "must be a non-empty string", "invalid_type" if text is not None else "missing_field")
        if "\0" in text:
            raise bad("text", "must not contain NUL")
        delay = self.integer(body, "delay_ms", 12, 0, 1000)
        with self.input_lock:
            self.display.map_characters(text)
            xdotool("type", "--clearmodifiers", "--delay", delay, "--", text)
        return {"typed": len(text)}

    def press_keys(self, body, action="key"):
        keys = body.get("keys")
        if isinstance(keys, str):
            combos = [self.key_combo(keys, "keys")]
        elif isinstance(keys, list) and len(keys) == 1:  # the control plane sends "ctrl+l" as ["ctrl+l"]
            combos = [self.key_combo(keys[0], "keys")]
        elif isinstance(keys, list) and keys and len(keys) <= 100:
            combos = [self.key_combo(k, "keys[%d]" % i) for i, k in enumerate(keys)]
        else:
            raise bad("keys", "must be a key such as \"ctrl+l\" or a list of 1 to 100 of them",
                      "invalid_type" if keys is not None else "missing_field")
        options = ["--clearmodifiers"] if action == "key" else []
        if action == "key" and len(combos) > 1:  # (a delay would also follow the last key)
            options += ["--delay", 30]
        with self.input_lock:
            xdotool(action, *options, *combos)
        return {"keys": combos}

    def focus(self, body):
        wid = body.get("id")
        if isinstance(wid, bool) or not isinstance(wid, int):
            raise bad("id", "must be an integer window id", "invalid_type" if wid is not None else "missing_field")
        if wid not in {w["id"] for w in self.display.windows()}:
            raise ApiError(404, "window_not_found", "id: no window %d on the desktop" % wid, "id")
        with self.input_lock:
            xdotool("windowactivate", "--sync", wid)
        return {"id": wid, "focused": self.display.active_window() == wid}

    def open_url(self, body):
        url = body.get("url")
        if url is None:
            raise bad("url", "required", "missing_field")
        if not isinstance(url, str):
            raise bad("url", "must be a string", "invalid_type")
        if not re.match(r"^(https?|file|about|data|chrome):", url) or "\0" in url:
            raise bad("url", "must be an http(s)://, file://, about: or data: URL")
        # the running Chromium takes the URL (new tab) and this process exits at once
        proc = subprocess.Popen(["chromium-desktop", url], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        threading.Thread(target=proc.wait, daemon=True).start()  # reaped, never a zombie
        return {"url": url}


# --- screenshots --------------------------------------------------------------------------

def region_of(query, size):
    w, h = size
    fields = ("x", "y", "width", "height")
    given = {f: query.get(f) for f in fields if query.get(f) is not None}
    if not given:
        return 0, 0, w, h
    values = {}
    for f in fields:
        if f not in given:
            raise bad(f, "required with a region (x, y, width, height)", "missing_field")
        try:
            values[f] = int(given[f])
        except (TypeError, ValueError):
            raise bad(f, "must be an integer", "invalid_type") from None
    x, y, rw, rh = values["x"], values["y"], values["width"], values["height"]
    if not (0 <= x < w and 0 <= y < h):
        raise bad("x" if not 0 <= x < w else "y", "the region starts off the screen (%dx%d)" % (w, h), "off_screen")
    if rw < 1 or x + rw > w:
        raise bad("width", "the region must fit on the screen (%dx%d)" % (w, h), "off_screen")
    if rh < 1 or y + rh > h:
        raise bad("height", "the region must fit on the screen (%dx%d)" % (w, h), "off_screen")
    return x, y, rw, rh


def encode(pixels, fmt, quality, scale):
    import cv2

    if scale != 1.0:
        h, w = pixels.shape[:2]
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    if fmt == "png":
        ok, data = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        ok, data = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ApiError(500, "encode_failed", "could not encode the screenshot as %s" % fmt)
    return data.tobytes()


# --- screen parsing -----------------------------------------------------------------------

class Parser:
    """UI elements from pixels: RapidOCR text lines, OpenCV (or OmniParser) boxes, merged."""

    def __init__(self):
        self.lock = threading.Lock()  # one parse at a time: each one takes the whole vCPU
        self.ocr = None
        self.omni = None

    @staticmethod
    def omniparser_state():
        """(configured, usable, error): the operator mounts weights at /opt/omniparser."""
        configured = False
        try:
            with open("/proc/self/mountinfo") as f:
                configured = any(line.split()[4] == OMNIPARSER_DIR for line in f)
        except OSError:
            pass
        if not configured:
            return False, False, "no OmniParser weights are configured (SANDBOXD_OMNIPARSER_DIR)"
        model = os.path.join(OMNIPARSER_DIR, OMNIPARSER_MODEL)
        if os.path.isfile(model):
            return True, True, None
        pt = os.path.join(OMNIPARSER_DIR, "icon_detect/model.pt")
        if os.path.isfile(pt):
            return True, False, ("SANDBOXD_OMNIPARSER_DIR has icon_detect/model.pt but not %s: export it "
                                 "once with `yolo export model=icon_detect/model.pt format=onnx`" % OMNIPARSER_MODEL)
        return True, False, "SANDBOXD_OMNIPARSER_DIR has no %s" % OMNIPARSER_MODEL

    def _ocr(self):
        if self.ocr is None:
            from rapidocr_onnxruntime import RapidOCR

            # as many threads as the sandbox's CPU quota allows: more only get throttled
            self.ocr = RapidOCR(intra_op_num_threads=cpu_budget(), inter_op_num_threads=1)
        return self.ocr

    def texts(self, image):
        """OCR lines, cut into words (the Chinese-trained model drops spaces between English
        words, so the gaps come from the pixels), with per-character boxes."""
        import cv2

        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        result, _ = self._ocr()(image, use_cls=False, return_word_box=True)  # screens are never upside down
        lines = []
        for item in result or ():
            points, text, score = item[0], item[1], float(item[2])
            xs = [p[0] for p in points]
            ys = [p[1] for p in points]
            bbox = [max(0, int(min(xs))), max(0, int(min(ys))), int(max(xs)), int(max(ys))]
            chars = item[3:6] if len(item) >= 6 else None  # character boxes, characters, their scores
            lines.append(line_words(gray, bbox, text, score, chars))
        return lines

    @staticmethod
    def contour_boxes(image):
        """Rectangles drawn on screen (fields, buttons, panels, icons): outer contours of
        edges that fill most of their bounding rectangle."""
        import cv2
        import numpy as np

        h, w = image.shape[:2]
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        edges = cv2.dilate(cv2.Canny(gray, 30, 100), np.ones((3, 3), np.uint8))
        contours, _ = cv2.findContours(edges, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        boxes = []
        for c in contours:
            x, y, bw, bh = cv2.boundingRect(c)
            if bw < 12 or bh < 10 or bw * bh > 0.6 * w * h:
                continue
            if cv2.contourArea(c) < 0.8 * bw * bh:
                continue
            boxes.append({"kind": "box", "text": "", "bbox": [x, y, x + bw - 1, y + bh - 1], "confidence": 1.0})
        return dedupe(boxes)

    def omniparser_boxes(self, image):
        import cv2
        import numpy as np
        import onnxruntime

        if self.omni is None:
            self.omni = onnxruntime.InferenceSession(os.path.join(OMNIPARSER_DIR, OMNIPARSER_MODEL),
                                                     providers=["CPUExecutionProvider"])
        session = self.omni
        inp = session.get_inputs()[0]
        side = inp.shape[2] if isinstance(inp.shape[2], int) else 640
        h, w = image.shape[:2]
        scale = side / max(h, w)
        canvas = np.full((side, side, 3), 114, np.uint8)
        canvas[:round(h * scale), :round(w * scale)] = cv2.resize(image, (round(w * scale), round(h * scale)))
        blob = canvas[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32) / 255.0
        preds = session.run(None, {inp.name: blob})[0][0].T  # YOLOv8: (N, 4 + classes), boxes as cx, cy, w, h
        scores = preds[:, 4:].max(axis=1)
        keep = scores >= 0.05
        preds, scores = preds[keep], scores[keep]
        rects = [[float((cx - bw / 2) / scale), float((cy - bh / 2) / scale), float(bw / scale), float(bh / scale)]
                 for cx, cy, bw, bh in preds[:, :4]]
        chosen = cv2.dnn.NMSBoxes(rects, scores.tolist(), 0.05, 0.1) if rects else []
        boxes = []
        for i in np.array(chosen).flatten():
            x, y, bw, bh = rects[int(i)]
            boxes.append({"kind": "icon", "text": "", "confidence": round(float(scores[int(i)]), 3),
                          "bbox": [max(0, int(x)), max(0, int(y)), min(w - 1, int(x + bw)), min(h - 1, int(y + bh))]})
        return boxes

    def parse(self, image, detector):
        configured, usable, why = self.omniparser_state()
        if detector == "omniparser" and not usable:
            raise ApiError(409, "omniparser_unavailable", "detector: " + why, "detector")
        use_omni = detector == "omniparser" or (detector == "auto" and usable)
        with self.lock:
            t0 = time.monotonic()
            lines = self.texts(image)
            t1 = time.monotonic()
            boxes = None
            if use_omni:
                try:
                    boxes = self.omniparser_boxes(image)
                except Exception as e:  # noqa: BLE001 -- a model that is not OmniParser's YOLO export
                    why = "%s did not run: %s: %s" % (OMNIPARSER_MODEL, type(e).__name__, str(e)[:300])
                    if detector == "omniparser":
                        raise ApiError(409, "omniparser_unavailable", "detector: " + why, "detector") from None
                    use_omni = False
            if boxes is None:
                boxes = self.contour_boxes(image)
            t2 = time.monotonic()
        timings = {"ocr_ms": round((t1 - t0) * 1000), "boxes_ms": round((t2 - t1) * 1000)}
        info = {"detector": "omniparser" if use_omni else "opencv", "timings": timings}
        if configured and not use_omni and why:
            info["omniparser_error"] = why
        texts = [t for words in lines for t in split_by_boxes(words, boxes)]
        return merge(texts, boxes), info


def line_words(gray, bbox, text, score, chars):
    """[{text, bbox, confidence}] for each word of an OCR line: ink columns separated by a
    gap of at least a fifth of the line's height end a word; characters go to the word
    their box's centre falls in. Without character boxes the line is one word."""
    import numpy as np

    x1, y1, x2, y2 = bbox
    whole = [{"text": text, "bbox": bbox, "confidence": score}]
    if not chars or len(chars[0]) != len(chars[1]) or x2 - x1 < 4 or y2 - y1 < 4:
        return whole
    crop = gray[y1:y2 + 1, x1:x2 + 1].astype(np.int16)
    background = int(np.median(np.concatenate([crop[0], crop[-1], crop[:, 0], crop[:, -1]])))
    ink = (np.abs(crop - background) > 60).any(axis=0)
    gap = max(3, round(0.2 * (y2 - y1 + 1)))
    spans, start, blank = [], None, 0
    for col, inked in enumerate(ink):
        if inked:
            if start is None:
                start = col
            elif blank >= gap:
                spans.append((start, col - blank - 1))
                start = col
            blank = 0
        elif start is not None:
            blank += 1
    if start is not None:
        spans.append((start, len(ink) - 1 - blank))
    if len(spans) < 2:
        return whole
    words = [{"chars": [], "scores": [], "bbox": [x1 + a, y1, x1 + b, y2]} for a, b in spans]
    for box, ch, sc in zip(*chars):
        if ch.isspace():
            continue
        centre = (min(p[0] for p in box) + max(p[0] for p in box)) / 2 - x1
        nearest = min(range(len(spans)), key=lambda i: 0 if spans[i][0] <= centre <= spans[i][1]
                      else min(abs(centre - spans[i][0]), abs(centre - spans[i][1])))
        words[nearest]["chars"].append(ch)
        words[nearest]["scores"].append(float(sc))
    return [{"text": "".join(w["chars"]), "bbox": w["bbox"], "confidence": sum(w["scores"]) / len(w["scores"])}
            for w in words if w["chars"]]


def control_of(bbox, boxes):
    """The smallest control-sized box holding bbox (see merge), or None."""
    height = bbox[3] - bbox[1] + 1
    holders = [b for b in boxes if inside(bbox, b["bbox"]) and b["bbox"][3] - b["bbox"][1] + 1 <= 3.5 * height]
    return min(holders, key=lambda b: area(b["bbox"])) if holders else None


def split_by_boxes(words, boxes):
    """A line's words as text elements: consecutive words in the same control (or in none)
    form one element, so "Submit" and "Your email" on one line become two when they sit in
    a button and a field."""
    out = []
    for word in words:
        owner = control_of(word["bbox"], boxes)
        if out and out[-1][0] is owner:
            element = out[-1][1]
            element["text"] += " " + word["text"]
            element["bbox"] = [min(element["bbox"][0], word["bbox"][0]), min(element["bbox"][1], word["bbox"][1]),
                               max(element["bbox"][2], word["bbox"][2]), max(element["bbox"][3], word["bbox"][3])]
            element["confidence"] = min(element["confidence"], word["confidence"])
        else:
            out.append((owner, {"kind": "text", "text": word["text"], "bbox": list(word["bbox"]),
                                "confidence": word["confidence"]}))
    return [{**element, "confidence": round(element["confidence"], 3)} for _, element in out]


def cpu_budget():
    """Whole CPUs of the sandbox's CFS quota (cgroup v2 or v1), at least 1."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
    except OSError:
        try:
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as g:
                quota, period = f.read().strip(), g.read().strip()
        except OSError:
            quota, period = "max", "1"
    cpus = len(os.sched_getaffinity(0))
    if quota in ("max", "-1"):
        return cpus
    return max(1, min(cpus, -(-int(quota) // int(period))))


def area(b):
    return max(0, b[2] - b[0] + 1) * max(0, b[3] - b[1] + 1)


def inside(inner, outer, slack=2):
    return (inner[0] >= outer[0] - slack and inner[1] >= outer[1] - slack
            and inner[2] <= outer[2] + slack and inner[3] <= outer[3] + slack)


def iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    return inter / float(area(a) + area(b) - inter) if inter else 0.0


def dedupe(boxes):
    """Edge outlines come out as nested near-copies (both sides of a border): keep one."""
    kept = []
    for b in sorted(boxes, key=lambda e: -area(e["bbox"])):
        if all(iou(b["bbox"], k["bbox"]) < 0.85 for k in kept):
            kept.append(b)
    return kept


def merge(texts, boxes):
    """Texts sitting in a control-sized box (a button, a field, a tab) become that box's
    text; larger boxes (panels, windows) keep their texts as separate elements. A box that
    only outlines its own text is that text. Small square boxes without text are icons."""
    texts = sorted(texts, key=lambda t: (t["bbox"][1], t["bbox"][0]))
    boxes = sorted(boxes, key=lambda b: area(b["bbox"]))
    absorbed = set()
    for b in boxes:
        bb = b["bbox"]
        members = [i for i, t in enumerate(texts) if i not in absorbed and inside(t["bbox"], bb)]
        if not members:
            continue
        tallest = max(texts[i]["bbox"][3] - texts[i]["bbox"][1] + 1 for i in members)
        if bb[3] - bb[1] + 1 > 3.5 * tallest:  # a container, not a control
            continue
        b["text"] = " ".join(texts[i]["text"] for i in members)
        b["confidence"] = round(min([texts[i]["confidence"] for i in members] + [b["confidence"]]), 3)
        if b["kind"] == "icon":
            b["kind"] = "box"
        absorbed.update(members)
    elements = [t for i, t in enumerate(texts) if i not in absorbed]
    for b in boxes:
        x1, y1, x2, y2 = b["bbox"]
        bw, bh = x2 - x1 + 1, y2 - y1 + 1
        if not b["text"] and b["kind"] == "box" and bw <= 64 and bh <= 64 and 0.6 <= bw / bh <= 1.67:
            b["kind"] = "icon"
        elements.append(b)
    elements.sort(key=lambda e: (e["bbox"][1], e["bbox"][0]))
    out = []
    for i, e in enumerate(elements):
        x1, y1, x2, y2 = e["bbox"]
        out.append({"id": i, "kind": e["kind"], "text": e["text"], "bbox": [x1, y1, x2, y2],
                    "center": [(x1 + x2) // 2, (y1 + y2) // 2], "confidence": e["confidence"]})
    return out


# --- HTTP ---------------------------------------------------------------------------------

class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def server_bind(self):  # no getfqdn(): a reverse lookup can hang in a sandbox
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        socketserver.TCPServer.server_bind(self)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sandboxd-desktop"
    app = None  # set in main()

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def address_string(self):  # never a reverse lookup
        return self.client_address[0]

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def send(self, status, body, content_type="application/json"):
        if not isinstance(body, bytes):
            body = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def body(self):
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(400, "invalid_request", "send a Content-Length body")
        n = int(length) if length and length.isdigit() else 0
        if n > MAX_BODY:
            raise ApiError(413, "payload_too_large", "request body over %d bytes" % MAX_BODY)
        raw = self.rfile.read(n) if n else b""
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise ApiError(400, "invalid_json", "request body is not valid JSON: %s" % e) from None
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_type", "request body must be a JSON object")
        return data

    def dispatch(self, method):
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            body = self.body() if method == "POST" else {}
            if url.path != "/health":
                given = self.headers.get("X-Desktop-Token", "")
                if not hmac.compare_digest(given.encode(), self.app.secrets["api_token"].encode()):
                    raise ApiError(401, "unauthorized", "missing or wrong X-Desktop-Token")
            route = self.app.routes.get((method, url.path))
            if route is None:
                raise ApiError(404, "not_found", "no route %s %s" % (method, url.path))
            result = route(query, body)
        except ApiError as e:
            error = {"code": e.code, "message": e.message}
            if e.field:
                error["field"] = e.field
            self.send(e.status, {"error": error})
            return
        except Exception as e:  # noqa: BLE001 -- reported, and the server keeps serving
            sys.stderr.write("desktop-server: %s %s failed: %r\n" % (method, url.path, e))
            self.send(500, {"error": {"code": "desktop_error", "message": "%s: %s" % (type(e).__name__, e)}})
            if type(e).__name__ == "ConnectionClosedError":  # the X server restarted: so do we (restart=always)
                threading.Timer(0.1, os._exit, (1,)).start()
            return
        if isinstance(result, tuple):  # (bytes, content type)
            self.send(200, result[0], result[1])
        else:
            self.send(200, result)


class App:
    def __init__(self, display):
        self.secrets = load_secrets()
        self.display = display
        self.desktop = Desktop(display)
        self.parser = Parser()
        d = self.desktop
        self.routes = {
            ("GET", "/health"): self.health,
            ("GET", "/screen"): self.screen,
            ("GET", "/cursor"): lambda q, b: dict(zip(("x", "y"), display.cursor())),
            ("GET", "/screenshot"): self.screenshot,
            ("GET", "/windows"): lambda q, b: {"windows": display.windows()},
            ("POST", "/windows/focus"): lambda q, b: d.focus(b),
            ("POST", "/mouse/move"): lambda q, b: d.move(b),
            ("POST", "/mouse/click"): lambda q, b: d.click(b),
            ("POST", "/mouse/down"): lambda q, b: d.press_button(b, True),
            ("POST", "/mouse/up"): lambda q, b: d.press_button(b, False),
            ("POST", "/mouse/drag"): lambda q, b: d.drag(b),
            ("POST", "/mouse/scroll"): lambda q, b: d.scroll(b),
            ("POST", "/keyboard/type"): lambda q, b: d.type_text(b),
            ("POST", "/keyboard/press"): lambda q, b: d.press_keys(b),
            ("POST", "/keyboard/down"): lambda q, b: d.press_keys(b, "keydown"),
            ("POST", "/keyboard/up"): lambda q, b: d.press_keys(b, "keyup"),
            ("POST", "/open"): lambda q, b: d.open_url(b),
            ("POST", "/parse"): self.parse,
        }

    def health(self, query, body):
        configured, usable, why = Parser.omniparser_state()
        return {"ok": True, "omniparser": {"configured": configured, "usable": usable, "error": why}}

    def screen(self, query, body):
        w, h = self.display.size()
        return {"width": w, "height": h, "depth": self.display.depth()}

    def screenshot(self, query, body):
        fmt = query.get("format", "png").lower()
        if fmt in ("jpg", "jpeg"):
            fmt = "jpeg"
        elif fmt != "png":
            raise bad("format", "must be png or jpeg")
        try:
            quality = int(query.get("quality", 80))
            if not 1 <= quality <= 100:
                raise ValueError
        except ValueError:
            raise bad("quality", "must be an integer from 1 to 100") from None
        try:
            scale = float(query.get("scale", 1))
            if not 0.05 <= scale <= 2:
                raise ValueError
        except ValueError:
            raise bad("scale", "must be a number from 0.05 to 2") from None
        x, y, w, h = region_of(query, self.display.size())
        data = encode(self.display.capture(x, y, w, h), fmt, quality, scale)
        return data, "image/png" if fmt == "png" else "image/jpeg"

    def parse(self, query, body):
        detector = Desktop.choice(body, "detector", {"auto", "opencv", "omniparser"}, "auto")
        size = self.display.size()
        region = body.get("region")
        if region is None:
            x, y, w, h = 0, 0, size[0], size[1]
        elif isinstance(region, list) and len(region) == 4 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in region):
            x1, y1, x2, y2 = region  # inclusive, like an element's bbox
            if not (0 <= x1 < x2 < size[0] and 0 <= y1 < y2 < size[1]):
                raise bad("region", "[x1, y1, x2, y2] must be on the screen (%dx%d) with x1 < x2, y1 < y2" % size,
                          "off_screen")
            x, y, w, h = x1, y1, x2 - x1 + 1, y2 - y1 + 1
        else:
            raise bad("region", "must be [x1, y1, x2, y2]", "invalid_type")
        min_conf = body.get("min_confidence", 0.5)
        if isinstance(min_conf, bool) or not isinstance(min_conf, (int, float)) or not 0 <= min_conf <= 1:
            raise bad("min_confidence", "must be a number from 0 to 1")
        t0 = time.monotonic()
        image = self.display.capture(x, y, w, h)
        elements, info = self.parser.parse(image, detector)
        kept = []
        for e in elements:
            if e["confidence"] < min_conf:
                continue
            e["bbox"] = [e["bbox"][0] + x, e["bbox"][1] + y, e["bbox"][2] + x, e["bbox"][3] + y]
            e["center"] = [e["center"][0] + x, e["center"][1] + y]
            e["id"] = len(kept)
            kept.append(e)
        info["timings"]["total_ms"] = round((time.monotonic() - t0) * 1000)
        return {"width": size[0], "height": size[1], "region": [x, y, x + w - 1, y + h - 1], "elements": kept, **info}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=6090)
    ap.add_argument("--host", default="0.0.0.0")
    args = ap.parse_args()
    display = None
    while display is None:  # the X server may still be starting
        try:
            display = Display()
        except Exception as e:  # noqa: BLE001 -- Xlib raises several kinds while :1 is not up
            sys.stderr.write("desktop-server: waiting for the X display: %s\n" % e)
            time.sleep(0.2)
    Handler.app = App(display)
    with Server((args.host, args.port), Handler) as server:
        sys.stderr.write("desktop-server: listening on %s:%d\n" % (args.host, args.port))
        server.serve_forever()


if __name__ == "__main__":
    main()
