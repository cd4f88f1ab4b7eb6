// Seed 003's README client, "JavaScript 客户端（SSE）", verbatim (../shared/seeds/003_*.txt).
// Not a module of its own: tests/browser/seed003.mjs runs this text in a page, inside an async
// function that defines `fileInput`, with `http://localhost:8000` replaced by the gateway and
// `window.location.href = <url>` by a recording of that URL.

// 1. 提交任务
const formData = new FormData();
formData.append('file', fileInput.files[0]);

const response = await fetch('http://localhost:8000/predict', {
  method: 'POST',
  body: formData
});
const taskInfo = await response.json();

// 2. 监听 SSE 状态更新
const eventSource = new EventSource(`http://localhost:8000/stream/${taskInfo.task_id}`);

eventSource.addEventListener('status', (event) => {
  const data = JSON.parse(event.data);
  
  if (data.status === 'failed') {
    console.error('Task failed:', data.message);
    eventSource.close();
  } else if (data.status === 'completed') {
    console.log('Task completed!');
    eventSource.close();
    // 下载结果
    window.location.href = `http://localhost:8000/result/${taskInfo.task_id}`;
  } else {
    console.log('Status:', data.status);
  }
});
