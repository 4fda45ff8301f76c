// Save Erasure Patch shows where it saved the patch: the "text" its execution reports becomes a
// read-only line on the node (not saved with the workflow, so shared workflows keep their values).
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "svare.SavedPatchPath",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "SvareSaveErasurePatch") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join(" ");
      if (!text) return;
      let widget = this.widgets?.find((w) => w.name === "saved_to");
      if (!widget) {
        widget = this.addWidget("text", "saved_to", text, () => {}, { serialize: false });
        widget.disabled = true;
      }
      widget.value = text;
      this.setDirtyCanvas(true, true);
    };
  },
});

// A new Erase Concept node starts with its seed "fixed": pressing Run again then reuses the trained
// patch from ComfyUI's cache instead of retraining (the frontend gives every "seed" widget
// "randomize", and a node definition cannot change that). Only new nodes: onNodeCreated runs before
// a loaded workflow's values are applied, so a saved "randomize" stays what the file says.
const FIXED_SEED_NODES = new Set(["SvareEraseConcept"]);

app.registerExtension({
  name: "svare.FixedTrainingSeed",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!FIXED_SEED_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const control = this.widgets?.find((w) => w.name === "control_after_generate");
      if (control) control.value = "fixed";
      return result;
    };
  },
});
