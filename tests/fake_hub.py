"""A fake Hugging Face Hub on 127.0.0.1 for the upload calls huggingface_hub makes.

Answers create-repo, README YAML validation, preupload (every file inline, none through LFS)
and commit (NDJSON with base64 file contents) as the Hub does, and records what it received.
"""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml


class FakeHub:
    def __init__(self):
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, lower-cased headers)
        self.repos: dict[str, dict] = {}  # repo id -> create-repo body
        self.commits: list[dict] = []  # {"path", "summary", "files": {path: bytes}}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _post(self, path: str, data: bytes) -> tuple[int, dict]:
        if path == "/api/repos/create":
            body = json.loads(data)
            repo_id = f"{body.get('organization') or 'tester'}/{body['name']}"
            self.repos[repo_id] = body
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": "x"}
        if path == "/api/validate-yaml":
            content = json.loads(data)["content"]
            yaml.safe_load(content.split("---\n")[1])  # raises on a malformed card header
            return 200, {}
        if "/preupload/" in path:
            files = json.loads(data)["files"]
            return 200, {
                "files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                    for f in files
                ]
            }
        if "/commit/" in path:
            lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
            header = next(x["value"] for x in lines if x["key"] == "header")
            files = {
                x["value"]["path"]: base64.b64decode(x["value"]["content"])
                for x in lines
                if x["key"] == "file"
            }
            self.commits.append({"path": path, "summary": header.get("summary"), "files": files})
            repo_id = path.split("/api/models/")[1].split("/commit/")[0]
            oid = "0" * 40
            return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid}
        return 404, {"error": f"unhandled {path}"}

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                hub.requests.append(("POST", self.path, headers))
                self._send(*hub._post(self.path.split("?")[0], data))

            def do_GET(self):
                headers = {k.lower(): v for k, v in self.headers.items()}
                hub.requests.append(("GET", self.path, headers))
                self._send(404, {"error": f"unhandled {self.path}"})

        return Handler
