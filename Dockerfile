# Hugging Face Docker Space: runs `python app.py` on port 7860 as user 1000.
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends ffmpeg libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

RUN useradd -m -u 1000 user
USER user
ENV HOME=/home/user PATH=/home/user/.local/bin:$PATH \
    PYTHONUNBUFFERED=1 GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860 \
    EMO_DATA_DIR=/home/user/app/data
WORKDIR /home/user/app

COPY --chown=user requirements.txt requirements-nodeps.txt install.sh ./
RUN sh install.sh
COPY --chown=user . .

EXPOSE 7860
CMD ["python", "app.py", "serve", "--host", "0.0.0.0", "--port", "7860"]
