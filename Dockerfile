# The Astro Runtime image for Airflow 3.3. Its build steps install packages.txt (OS packages) and
# requirements.txt (our runtime dependencies on top of the image's own Airflow) and copy the project
# in; the one step below installs the provider from the copied project. requirements-dev.txt and
# constraints.txt are for local venvs.
FROM astrocrpublic.azurecr.io/runtime:3.3-2
# The FullStory provider (plugins/fullstory_provider, declared in pyproject.toml): installing it registers
# its `apache_airflow_provider` entry point, so the UI offers the `fullstory` connection type. Editable,
# so the code stays the one copy in plugins/; --no-deps: its packages are requirements.txt's.
RUN pip install --no-cache-dir --no-deps -e .
