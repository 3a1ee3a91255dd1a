"""The online service: FastAPI over the user tower, the FAISS item index and Redis (see service/app.py)."""
