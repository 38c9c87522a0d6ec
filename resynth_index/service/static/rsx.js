// rsx serve: the query page's only script. It uploads through the JSON API (async=1), polls the
// job while the worker captions, generates and embeds, then opens the answer's page. Text from
// the server is only ever put in the page as text (textContent), never as HTML.
"use strict";

(function () {
  const form = document.getElementById("query-form");
  if (!form) return;
  const input = document.getElementById("image");
  const drop = document.getElementById("drop");
  const preview = document.getElementById("preview");
  const progress = document.getElementById("progress");
  const bar = document.getElementById("progress-bar");
  const stage = document.getElementById("stage");
  const error = document.getElementById("error");
  const submit = document.getElementById("submit");

  function showError(message) {
    error.textContent = message;
    error.hidden = false;
    progress.hidden = true;
    submit.disabled = false;
  }

  function showPreview() {
    const file = input.files && input.files[0];
    if (!file) { preview.hidden = true; return; }
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
  }

  input.addEventListener("change", showPreview);
  ["dragenter", "dragover"].forEach(function (name) {
    drop.addEventListener(name, function (event) {
      event.preventDefault();
      drop.classList.add("over");
    });
  });
  ["dragleave", "drop"].forEach(function (name) {
    drop.addEventListener(name, function () { drop.classList.remove("over"); });
  });
  drop.addEventListener("drop", function (event) {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      showPreview();
    }
  });

  function showStage(job) {
    stage.textContent = job.stage;
    if (job.total > 0) {
      bar.max = job.total;
      bar.value = job.done;
    } else {
      bar.removeAttribute("value");
    }
  }

  async function poll(location) {
    for (;;) {
      const response = await fetch(location, { headers: { Accept: "application/json" } });
      const job = await response.json();
      if (!response.ok) { showError(job.error || "the job was lost"); return; }
      showStage(job);
      if (job.state === "done") {
        window.location.assign("/queries/" + encodeURIComponent(job.query_id));
        return;
      }
      if (job.state === "failed") { showError(job.error); return; }
      await new Promise(function (resolve) { setTimeout(resolve, 250); });
    }
  }

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    error.hidden = true;
    if (!input.files || !input.files.length) { showError("choose an image first"); return; }
    const data = new FormData(form);
    const chosen = data.getAll("candidate");
    data.delete("candidate");
    if (!chosen.length) { showError("choose at least one candidate"); return; }
    data.set("candidates", chosen.join(","));
    data.set("async", "1");
    submit.disabled = true;
    progress.hidden = false;
    stage.textContent = "uploading";
    try {
      const response = await fetch("/v1/query", {
        method: "POST",
        body: data,
        headers: { "X-CSRF-Token": data.get("csrf") || "", Accept: "application/json" },
      });
      const job = await response.json();
      if (response.status !== 202) { showError(job.error || "the query was refused"); return; }
      showStage(job);
      await poll("/v1/jobs/" + encodeURIComponent(job.job));
    } catch (failure) {
      showError("the service could not be reached: " + failure);
    }
  });
})();
