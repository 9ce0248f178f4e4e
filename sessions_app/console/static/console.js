// The console's only script: the copy button of a new key's secret. Everything else is
// plain links and forms, so every page works without it.
"use strict";

document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    button.addEventListener("click", function () {
      var field = document.getElementById(button.getAttribute("data-copy"));
      var status = document.getElementById(button.getAttribute("aria-describedby"));
      if (!field) {
        return;
      }
      function copied(ok) {
        if (status) {
          status.textContent = ok ? "Copied." : "Select the text and copy it.";
        }
      }
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(field.value).then(
          function () { copied(true); },
          function () { field.select(); copied(false); }
        );
      } else {
        field.select();
        copied(document.execCommand && document.execCommand("copy"));
      }
    });
  });
});
