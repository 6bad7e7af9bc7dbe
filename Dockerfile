# medseg on a CUDA-capable PyTorch base. Build: docker build -t medseg .
# Run:  docker run --gpus all --shm-size=8g -v /path/to/data:/data -v /path/to/outputs:/outputs medseg \
#         train data=msd data.root=/data/Task04_Hippocampus
# (--shm-size: loader workers pass batches through /dev/shm, 64 MiB by default in Docker; --ipc=host also works)
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1
RUN useradd --create-home --uid 1000 medseg
WORKDIR /opt/medseg
COPY --chown=medseg:medseg pyproject.toml README.md ./
# the Hydra configs come with src (src/medseg/configs, package data)
COPY --chown=medseg:medseg src ./src
COPY --chown=medseg:medseg scripts ./scripts
COPY --chown=medseg:medseg data_manifests ./data_manifests
# the same install step as README.md (torch comes with the base image, CUDA build)
RUN pip install -e .

USER medseg
VOLUME ["/data", "/outputs"]
WORKDIR /outputs
# paths.output and paths.preprocessed default to ./outputs: with WORKDIR /outputs they land on the volume
ENTRYPOINT ["/opt/medseg/scripts/docker-entrypoint.sh"]
CMD ["train", "--help"]
