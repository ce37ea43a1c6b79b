from fastapi import FastAPI


def create_app() -> FastAPI:
    app = FastAPI(title="nanochat-stack inference", version="0.1.0")

    @app.get("/health")
    def health() -> dict:
        # No model is served yet: the chat endpoints come with the inference issue.
        return {"status": "ok", "model": None}

    return app
