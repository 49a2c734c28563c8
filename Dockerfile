# The Astro Runtime image for Airflow 3.3. Its build steps install packages.txt (OS packages) and
# requirements.txt (our runtime dependencies on top of the image's own Airflow) and copy the project
# in, so nothing else is needed here. requirements-dev.txt and constraints.txt are for local venvs.
FROM astrocrpublic.azurecr.io/runtime:3.3-2
