//! The seeds' own clients against Kiln: each seed README's requests (its curl lines, its Python,
//! its JavaScript in a real chromium), sent to a real `kiln gateway` serving the seed's route
//! table from `examples/http/`, in front of a real `kiln node` and a real nats-server. Every
//! response is checked field by field against the README (../shared/seeds/00{1,2,3,4}_*.txt).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const JOB: Duration = Duration::from_secs(60);

/// One seed's deployment: a node and a gateway, both from the same config file. Fields drop in
/// order: the gateway (printing its log if the test failed), then the cluster.
struct Seed {
    gateway: GatewayProcess,
    cluster: TestCluster,
    http: reqwest::Client,
}

impl Seed {
    /// The example table appended to the test timings, its `../workers/` and `../models/`
    /// made absolute; one node with one cpu slot, and a gateway.
    async fn start(example: &str) -> Seed {
        let examples = repo().join("examples");
        let table = std::fs::read_to_string(examples.join("http").join(example))
            .unwrap()
            .replace("\"../workers/", &format!("\"{}/workers/", examples.display()))
            .replace("\"../models/", &format!("\"{}/models/", examples.display()));
        Seed::with(&table).await
    }

    /// A node and a gateway from the test timings followed by `tail` (a table, or an
    /// `[http] include` of tables).
    async fn with(tail: &str) -> Seed {
        let mut cluster = TestCluster::new();
        let config = format!("{}{tail}", config_toml(&cluster.url(), &["cpu:0"], 10_000, ""));
        cluster.add_node("n1", &config);
        let gateway = GatewayProcess::spawn(cluster.dir.path(), "gateway", &config, &cluster.url());
        cluster.wait_node_ready("n1", 1).await;
        Seed { gateway, cluster, http: http() }
    }

    fn url(&self, path: &str) -> String {
        self.gateway.url(path)
    }

    fn dir(&self) -> &Path {
        self.cluster.dir.path()
    }

    /// The node's and the gateway's logs, for assertion messages.
    fn logs(&self) -> String {
        format!("--- node\n{}\n--- gateway\n{}", self.cluster.nodes[0].log(), self.gateway.log())
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {status} {text:?} is not JSON: {e}")))
    }
}

/// Runs a program to its end (at most `limit`) in `dir`; its stdout. Fails the test on a
/// non-zero exit, with both outputs.
async fn run(program: &Path, args: &[&str], dir: &Path, limit: Duration) -> String {
    let child = tokio::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} did not end within {limit:?}", program.display()))
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "{} {args:?} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}", program.display(), out.status);
    stdout
}

/// Reads an SSE response into `text` until `until` holds for its events or the stream ends
/// (at most [`JOB`]); whether `until` held.
async fn read_sse_until(
    response: &mut reqwest::Response,
    text: &mut String,
    until: impl Fn(&[(Option<String>, String, String)]) -> bool,
) -> bool {
    let read = async {
        while !until(&parse_sse(text)) {
            match response.chunk().await.unwrap() {
                Some(chunk) => text.push_str(std::str::from_utf8(&chunk).unwrap()),
                None => return false,
            }
        }
        true
    };
    tokio::time::timeout(JOB, read).await.unwrap_or_else(|_| panic!("the event stream did not end: {text}"))
}

/// `curl` itself, as the READMEs run it.
async fn curl(args: &[&str], dir: &Path) -> String {
    run(Path::new("curl"), args, dir, JOB).await
}

/// Writes `script` (a README's Python, its base URL replaced by the gateway's) to `dir` and runs
/// it with the venv's Python (requests, sseclient); the JSON it prints on its `RESULT ` line.
async fn python(dir: &Path, name: &str, script: &str, readme_base: &str, base: &str) -> Value {
    assert!(script.contains(readme_base), "the script names {readme_base}");
    let path = dir.join(name);
    std::fs::write(&path, script.replace(readme_base, base)).unwrap();
    let stdout = run(&python_with_nats(), &[path.to_str().unwrap()], dir, JOB).await;
    let line = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")).unwrap_or_else(|| panic!("{name} printed no RESULT line:\n{stdout}"));
    serde_json::from_str(line).unwrap()
}

/// The keys of a JSON object, sorted.
fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap_or_else(|| panic!("{v} is not an object")).keys().map(String::as_str).collect();
    k.sort();
    k
}

/// `YYYY-MM-DD HH:MM:SS`, the seeds' timestamps.
fn is_seed_time(v: &Value) -> bool {
    let Some(s) = v.as_str() else { return false };
    s.len() == 19
        && s.char_indices().all(|(i, c)| match i {
            4 | 7 => c == '-',
            10 => c == ' ',
            13 | 16 => c == ':',
            _ => c.is_ascii_digit(),
        })
}

/// A PNG's (width, height), from its IHDR; panics unless the bytes are a PNG.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG: {:?}", &bytes[..bytes.len().min(16)]);
    assert_eq!(&bytes[12..16], b"IHDR");
    (u32::from_be_bytes(bytes[16..20].try_into().unwrap()), u32::from_be_bytes(bytes[20..24].try_into().unwrap()))
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A real RGB PNG of `width` x `height` (a gradient; zlib with stored blocks).
fn png(width: u32, height: u32) -> Vec<u8> {
    let mut raw = Vec::new();
    for y in 0..height {
        raw.push(0); // filter: none
        for x in 0..width {
            raw.extend_from_slice(&[(x * 255 / width) as u8, (y * 255 / height) as u8, ((x + y) * 7) as u8]);
        }
    }
    let mut zlib = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, block) in blocks.iter().enumerate() {
        zlib.push((i + 1 == blocks.len()) as u8);
        zlib.extend_from_slice(&(block.len() as u16).to_le_bytes());
        zlib.extend_from_slice(&(!(block.len() as u16)).to_le_bytes());
        zlib.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in &raw {
        a = (a + byte as u32) % 65_521;
        b = (b + a) % 65_521;
    }
    zlib.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &zlib);
    chunk(b"IEND", &[]);
    out
}

/// A short mono 16-bit PCM WAV (silence with a ramp).
fn wav(samples: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..samples).flat_map(|i| ((i % 200) as i16 * 50).to_le_bytes()).collect();
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&[1, 0, 1, 0]); // PCM, mono
    out.extend_from_slice(&16_000u32.to_le_bytes());
    out.extend_from_slice(&32_000u32.to_le_bytes());
    out.extend_from_slice(&[2, 0, 16, 0]);
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&data);
    out
}

// ------------------------------------------------------------------------------------------
// Seed 001: the image-generation service (`POST /generate_image`, `GET /check_status/{id}`,
// `GET /get_image/{id}`).

/// The README's body, with a small image and few steps so that it runs quickly on a CPU.
fn seed_001_body(model_name: &str) -> Value {
    json!({
      "model_name": model_name,
      "prompt": "a beautiful landscape",
      "negative_prompt": "blurry, low quality",
      "image_params": {
        "width": 64,
        "height": 64,
        "steps": 8
      },
      "loras": [],
      "user_id": "user123",
      "topic": "online_task"
    })
}

/// Polls `GET /check_status/{task_id}` until the task ends; every answer must have the table's
/// shape. The last answer.
async fn seed_001_wait(seed: &Seed, task_id: &str, model_name: &str) -> Value {
    let path = format!("/check_status/{task_id}");
    // (the last answer, the statuses seen in order)
    let state = std::sync::Mutex::new((Value::Null, Vec::<String>::new()));
    let done = eventually(JOB, || {
        let (path, state) = (&path, &state);
        async move {
            let (code, body) = seed.get(path).await;
            assert_eq!(code, 200, "{path}: {body}");
            assert_eq!(body["task_id"], task_id, "{body}");
            assert_eq!(body["model_name"], model_name, "{body}");
            assert!(is_seed_time(&body["created_at"]), "created_at {}", body["created_at"]);
            let status = body["status"].as_str().unwrap_or_else(|| panic!("no status: {body}")).to_string();
            assert!(["queued", "running", "retrying", "completed", "failed", "cancelled"].contains(&status.as_str()), "{body}");
            if status == "failed" {
                assert!(body["error"].is_string(), "a failed task says why: {body}");
            } else {
                assert_eq!(keys(&body), ["created_at", "model_name", "status", "task_id"], "error only when failed: {body}");
            }
            let mut state = state.lock().unwrap();
            if state.1.last() != Some(&status) {
                state.1.push(status.clone());
            }
            state.0 = body;
            ["completed", "failed", "cancelled"].contains(&status.as_str())
        }
    })
    .await;
    let (last, seen) = state.into_inner().unwrap();
    assert!(done, "task {task_id} did not end within {JOB:?}: {last}\n{}", seed.logs());
    println!("seed 001 {model_name}: check_status saw {seen:?}");
    last
}

/// `GET /get_image/{task_id}`: the PNG, as image/png.
async fn seed_001_image(seed: &Seed, task_id: &str) -> Vec<u8> {
    let r = seed.http.get(seed.url(&format!("/get_image/{task_id}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    r.bytes().await.unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_001_image_gen_readme_requests() {
    let started = Instant::now();
    let seed = Seed::start("seed-001-image-gen.toml").await;

    // The README's submit, sent by curl: `POST /generate_image`, `Content-Type: application/json`.
    let body = seed_001_body("flux-1-dev").to_string();
    let out = curl(
        &["-s", "-X", "POST", &seed.url("/generate_image"), "-H", "Content-Type: application/json", "-d", &body, "-w", "\n%{http_code}"],
        seed.dir(),
    )
    .await;
    let (reply, code) = out.rsplit_once('\n').unwrap();
    assert_eq!(code, "200", "{out}");
    let reply: Value = serde_json::from_str(reply).unwrap();
    assert_eq!(keys(&reply), ["status", "task_id"], "{reply}");
    assert_eq!(reply["status"], "queued", "{reply}");
    let flux = reply["task_id"].as_str().unwrap().to_string();
    assert!(!flux.is_empty());

    // Polled to its end, then the image.
    let last = seed_001_wait(&seed, &flux, "flux-1-dev").await;
    assert_eq!(last["status"], "completed", "{last}\n{}", seed.logs());
    let image = seed_001_image(&seed, &flux).await;
    assert_eq!(png_size(&image), (64, 64), "image_params.width and height reach the model");

    // The same body for the seed's other model (a resident Python worker).
    let r = seed.http.post(seed.url("/generate_image")).json(&seed_001_body("stable-diffusion-v1-5")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let reply: Value = r.json().await.unwrap();
    assert_eq!(keys(&reply), ["status", "task_id"], "{reply}");
    assert_eq!(reply["status"], "queued");
    let sd = reply["task_id"].as_str().unwrap().to_string();
    assert_ne!(sd, flux);
    let last = seed_001_wait(&seed, &sd, "stable-diffusion-v1-5").await;
    assert_eq!(last["status"], "completed", "{last}\n{}", seed.logs());
    assert_eq!(png_size(&seed_001_image(&seed, &sd).await), (64, 64));

    // A model the service does not have: 404 {code: "unknown_model", message}.
    let r = seed.http.post(seed.url("/generate_image")).json(&seed_001_body("sdxl-turbo")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let err: Value = r.json().await.unwrap();
    assert_eq!(keys(&err), ["code", "message"], "{err}");
    assert_eq!(err["code"], "unknown_model");
    assert!(err["message"].as_str().unwrap().contains("sdxl-turbo"), "{err}");

    // An unknown task: 404 on both GETs.
    let (code, err) = seed.get("/check_status/no-such-task").await;
    assert_eq!((code, err["code"].as_str()), (404, Some("not_found")), "{err}");
    let r = seed.http.get(seed.url("/get_image/no-such-task")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    println!("seed 001: {:.1} s", started.elapsed().as_secs_f64());
}

// ------------------------------------------------------------------------------------------
// Seed 002: the EchoMimic talking-head worker (temp-file API, task JSON, progress messages).

/// The README's section 5.2 client, its Redis parts replaced by the gateway's HTTP routes:
/// `redis_client.rpush(task_queue, json.dumps(task_data))` is `requests.post(.. /api/tasks,
/// json=task_data)` and the `task_progress` subscription is the task's SSE stream, read with
/// `SSEClient`. Everything else is the README's code (`os`, which the README forgot to import,
/// is imported; `steps` is 4 instead of 30). The test's own records are marked `# (test)`.
const SEED_002_CLIENT: &str = r#"
import json
import os
import sys
import uuid
import requests
from sseclient import SSEClient

UPLOADS = []  # (test) every upload reply
SUBMITS = []  # (test) every submit reply
MESSAGES = []  # (test) every progress message received, in order

def upload_file_to_tempfile_api(file_path, base_url="http://localhost:3000"):
    """
    上传文件到临时文件API
    """
    upload_url = f"{base_url}/api/tempfile/upload"
    
    with open(file_path, 'rb') as f:
        files = {'file': (os.path.basename(file_path), f)}
        response = requests.post(upload_url, files=files)
        UPLOADS.append({"status_code": response.status_code, "body": response.json()})  # (test)
        
        if response.status_code == 200:
            result = response.json()
            if result.get('success'):
                return result.get('file_id')
    
    return None

def submit_task_to_worker(ref_image_path, audio_path, base_url="http://localhost:3000"):
    """
    上传文件并将任务提交到Worker
    """
    # 上传参考图像和音频文件
    ref_image_id = upload_file_to_tempfile_api(ref_image_path, base_url)
    audio_id = upload_file_to_tempfile_api(audio_path, base_url)
    
    if not ref_image_id or not audio_id:
        print("文件上传失败")
        return None
    
    # 准备任务数据
    task_id = str(uuid.uuid4())
    session_id = str(uuid.uuid4())  # 通常应该使用实际用户的会话ID
    
    task_data = {
        "task_id": task_id,
        "session_id": session_id,
        "ref_image_id": ref_image_id,
        "audio_id": audio_id,
        "steps": 4,
        "cfg": 3.0,
        "seed": 42
    }
    
    # 将任务提交到队列 (Kiln's gateway instead of Redis)
    response = requests.post(f"{base_url}/api/tasks", json=task_data)
    SUBMITS.append({"status_code": response.status_code, "body": response.json()})  # (test)
    # (test) a client retrying its submit: the same task_id must not run a second job
    response = requests.post(f"{base_url}/api/tasks", json=task_data)
    SUBMITS.append({"status_code": response.status_code, "body": response.json()})  # (test)
    print(f"任务已提交，ID: {task_id}")
    return task_id, session_id

def follow(task_id, base_url="http://localhost:3000"):
    """The README's listen loop, over the task's SSE stream instead of `task_progress`."""
    video_file_id = None
    seen = []
    for message in SSEClient(f"{base_url}/api/tasks/{task_id}/progress"):
        # An SSE comment (keep-alive) is no message, as a pub/sub subscribe confirmation was not.
        if message.event == 'message' and message.data:
            data = json.loads(message.data)
            seen.append(data)  # (test)
            
            # 仅处理当前任务的消息
            if data.get('task_id') == task_id:
                status = data.get('status')
                
                if status == 'progress':
                    print(f"进度: {data.get('percentage')}% - {data.get('message', '')}")
                
                elif status == 'completed':
                    video_file_id = data.get('video_file_id')
                    print(f"任务完成！视频文件ID: {video_file_id}")
                    print(f"下载链接: http://localhost:3000/api/tempfile/download/{video_file_id}")
                    break
                
                # The README's example checks 'error'; its message format (3.2, 7) says 'failed'.
                elif status == 'error' or status == 'failed':
                    print(f"任务失败: {data.get('error')}")
                    break
    return video_file_id, seen

# 使用示例
if __name__ == "__main__":
    base_url = "http://localhost:3000"
    # 提交任务
    task_id, session_id = submit_task_to_worker(
        'reference_face.png',
        'audio.wav',
        base_url
    )
    
    if task_id:
        print(f"等待任务 {task_id} 完成...")
        video_file_id, live = follow(task_id, base_url)
        
        # 6. 下载结果: GET /api/tempfile/download/{video_file_id}
        video = requests.get(f"{base_url}/api/tempfile/download/{video_file_id}")
        with open("video.mp4", "wb") as f:
            f.write(video.content)
        
        # (test) a client that subscribes after the end: the seed's pub/sub told it nothing
        _, late = follow(task_id, base_url)
        # (test) the polling route
        latest = requests.get(f"{base_url}/api/tasks/{task_id}").json()
        
        print("RESULT " + json.dumps({
            "uploads": UPLOADS, "submits": SUBMITS, "task_id": task_id, "session_id": session_id,
            "live": live, "late": late, "latest": latest, "video_file_id": video_file_id,
            "video_status": video.status_code, "video_type": video.headers.get("content-type"),
        }))
"#;

const SEED_002_STATUSES: [&str; 7] = ["processing", "downloading", "face_detecting", "inference", "merging_audio", "completed", "failed"];

/// One progress message of the task, field by field (README 3.2).
fn check_seed_002_message(m: &Value, task_id: &str, session_id: &str) {
    assert_eq!(m["task_id"], task_id, "the client's own task_id: {m}");
    assert_eq!(m["session_id"], session_id, "{m}");
    let status = m["status"].as_str().unwrap_or_else(|| panic!("no status: {m}"));
    assert!(SEED_002_STATUSES.contains(&status), "status {status:?} is not one of the seed's: {m}");
    if let Some(p) = m.get("progress") {
        let p = p.as_f64().unwrap_or_else(|| panic!("progress is a number: {m}"));
        assert!((0.0..=100.0).contains(&p), "{m}");
    }
    if let Some(message) = m.get("message") {
        assert!(message.is_string(), "{m}");
    }
    assert_eq!(m.get("video_file_id").is_some(), status == "completed", "video_file_id only on completed: {m}");
    assert_eq!(m.get("error").is_some(), status == "failed", "error only on failed: {m}");
    for k in keys(m) {
        assert!(["task_id", "session_id", "status", "progress", "message", "video_file_id", "error"].contains(&k), "field {k}: {m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_002_talking_head_readme_python_client() {
    let started = Instant::now();
    let seed = Seed::start("seed-002-talking-head.toml").await;
    let work = tempfile::tempdir().unwrap();
    let face = png(40, 48);
    let voice = wav(16_000);
    std::fs::write(work.path().join("reference_face.png"), &face).unwrap();
    std::fs::write(work.path().join("audio.wav"), &voice).unwrap();

    let out = python(work.path(), "client.py", SEED_002_CLIENT, "http://localhost:3000", &seed.gateway.base).await;
    println!("seed 002 client: {out:#}");
    let task_id = out["task_id"].as_str().unwrap();
    let session_id = out["session_id"].as_str().unwrap();

    // 4.1: the uploads' replies.
    let uploads = out["uploads"].as_array().unwrap();
    assert_eq!(uploads.len(), 2, "{out}");
    for (upload, (kind, name)) in uploads.iter().zip([("image", "reference_face.png"), ("audio", "audio.wav")]) {
        assert_eq!(upload["status_code"], 200, "{upload}");
        let body = &upload["body"];
        assert_eq!(keys(body), ["file_id", "file_type", "original_name", "success"], "{body}");
        assert_eq!(body["success"], true);
        assert_eq!(body["file_type"], kind, "{body}");
        assert_eq!(body["original_name"], name, "{body}");
        let id = body["file_id"].as_str().unwrap();
        assert!(uuid::Uuid::parse_str(id).is_ok(), "a plain uuid, as the seed's: {id}");
    }
    // The uploaded files download again, byte for byte.
    for (upload, bytes) in uploads.iter().zip([&face, &voice]) {
        let id = upload["body"]["file_id"].as_str().unwrap();
        let r = seed.http.get(seed.url(&format!("/api/tempfile/download/{id}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(&r.bytes().await.unwrap()[..], &bytes[..]);
    }

    // The submit (twice: a retrying client) answers with the client's own task_id.
    let submits = out["submits"].as_array().unwrap();
    assert_eq!(submits.len(), 2);
    for s in submits {
        assert_eq!(s["status_code"], 200, "{s}");
        let body = &s["body"];
        assert_eq!(keys(body), ["status", "success", "task_id"], "{body}");
        assert_eq!((&body["success"], &body["task_id"]), (&json!(true), &json!(task_id)), "{body}");
        assert!(SEED_002_STATUSES.contains(&body["status"].as_str().unwrap()), "not a status of the seed's (README 3.2): {body}");
    }
    assert_eq!(submits[0]["body"]["status"], "processing", "{}", submits[0]);

    // 3.2: every message, and their order.
    let live = out["live"].as_array().unwrap();
    for m in live {
        check_seed_002_message(m, task_id, session_id);
    }
    let statuses: Vec<&str> = live.iter().map(|m| m["status"].as_str().unwrap()).fold(vec![], |mut v, s| {
        if v.last() != Some(&s) {
            v.push(s);
        }
        v
    });
    assert_eq!(statuses, ["processing", "downloading", "face_detecting", "inference", "merging_audio", "completed"], "{live:#?}");
    let progress: Vec<f64> = live.iter().filter_map(|m| m.get("progress")).map(|p| p.as_f64().unwrap()).collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "progress never goes back: {progress:?}");
    assert_eq!(progress.last(), Some(&100.0), "{live:#?}");
    let inference = live.iter().filter(|m| m["status"] == "inference").count();
    assert_eq!(inference, 4, "one inference message per step: {live:#?}");
    let completed = live.last().unwrap();
    assert_eq!(completed["status"], "completed");
    assert_eq!(completed["video_file_id"], out["video_file_id"]);

    // 6: the video, by its video_file_id.
    assert_eq!(out["video_status"], 200, "{out}");
    assert_eq!(out["video_type"], "video/mp4", "{out}");
    let video = std::fs::read(work.path().join("video.mp4")).unwrap();
    assert_eq!(&video[4..8], b"ftyp", "the worker's MP4: {:?}", &video[..video.len().min(16)]);
    assert_eq!(video.len(), 4096);

    // A client that subscribes after the end still gets the whole sequence.
    assert_eq!(out["late"], out["live"], "the late client replays every message");

    // The polling route: the latest message.
    let latest = &out["latest"];
    assert_eq!(keys(latest), ["session_id", "status", "task_id", "video_file_id"], "{latest}");
    assert_eq!((&latest["status"], &latest["video_file_id"]), (&json!("completed"), &out["video_file_id"]), "{latest}");
    assert_eq!((&latest["task_id"], &latest["session_id"]), (&json!(task_id), &json!(session_id)));

    // The same task_id submitted again after the end: the same task, completed.
    let task_data = |task_id: &str, steps: u32| {
        json!({"task_id": task_id, "session_id": session_id, "ref_image_id": uploads[0]["body"]["file_id"],
               "audio_id": uploads[1]["body"]["file_id"], "steps": steps, "cfg": 3.0, "seed": 42})
    };
    let again = seed.http.post(seed.url("/api/tasks")).json(&task_data(task_id, 4)).send().await.unwrap();
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again, json!({"success": true, "task_id": task_id, "status": "completed"}));

    // A client retrying its submit while the task runs (its first inference message is out):
    // the reply's status is one of the seed's too.
    let slow = uuid::Uuid::new_v4().to_string();
    let first: Value = seed.http.post(seed.url("/api/tasks")).json(&task_data(&slow, 200)).send().await.unwrap().json().await.unwrap();
    assert_eq!(first, json!({"success": true, "task_id": slow, "status": "processing"}));
    let mut stream = seed.http.get(seed.url(&format!("/api/tasks/{slow}/progress"))).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    let mut text = String::new();
    let running = read_sse_until(&mut stream, &mut text, |events| events.iter().any(|(_, _, data)| data.contains("\"inference\""))).await;
    assert!(running, "{text}\n{}", seed.logs());
    let retry: Value = seed.http.post(seed.url("/api/tasks")).json(&task_data(&slow, 200)).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        retry,
        json!({"success": true, "task_id": slow, "status": "processing"}),
        "a running task is `processing` to the seed's clients (README 3.2), not Kiln's `running`"
    );
    // Cancelled by an operator (Kiln's API: the seed had no cancel): `failed`, with an error.
    let (_, jobs) = seed.get("/v1/jobs?model=echomimic").await;
    let job = jobs["jobs"].as_array().unwrap().iter().find(|j| j["labels"]["task_id"] == slow.as_str()).unwrap()["job_id"].clone();
    let r = seed.http.post(seed.url(&format!("/v1/jobs/{}/cancel", job.as_str().unwrap()))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    read_sse_until(&mut stream, &mut text, |_| false).await;
    let messages: Vec<Value> = parse_sse(&text).iter().map(|(_, _, data)| serde_json::from_str(data).unwrap()).collect();
    for m in &messages {
        check_seed_002_message(m, &slow, session_id);
    }
    let last = messages.last().unwrap();
    assert_eq!(last["status"], "failed", "{last}");
    assert!(last["error"].as_str().is_some_and(|e| !e.is_empty()), "README 7: a failed message says why in `error`: {last}");

    // A task that fails (its ref_image is the audio): `failed` with the worker's error.
    let bad = uuid::Uuid::new_v4().to_string();
    let mut data = task_data(&bad, 4);
    data["ref_image_id"] = uploads[1]["body"]["file_id"].clone();
    let r: Value = seed.http.post(seed.url("/api/tasks")).json(&data).send().await.unwrap().json().await.unwrap();
    assert_eq!(r, json!({"success": true, "task_id": bad, "status": "processing"}));
    let stream = seed.http.get(seed.url(&format!("/api/tasks/{bad}/progress"))).send().await.unwrap();
    let messages: Vec<Value> = read_sse(stream, JOB).await.iter().map(|(_, _, data)| serde_json::from_str(data).unwrap()).collect();
    for m in &messages {
        check_seed_002_message(m, &bad, session_id);
    }
    let last = messages.last().unwrap();
    assert_eq!(last["status"], "failed", "{messages:#?}");
    assert!(last["error"].as_str().is_some_and(|e| e.contains("ref_image")), "{last}");
    // Issue 23 item 12: the worker's message named the file by the node's path; the client
    // sees the input's name, never a folder of the node's.
    assert!(!last["error"].as_str().unwrap().contains('/'), "no node path in a task's error: {last}");
    let (code, latest) = seed.get(&format!("/api/tasks/{bad}")).await;
    assert_eq!(code, 200);
    assert_eq!(keys(&latest), ["error", "session_id", "status", "task_id"], "{latest}");
    assert_eq!((&latest["status"], &latest["error"]), (&json!("failed"), &last["error"]), "{latest}");

    // Each task_id ran one job, once.
    let (code, jobs) = seed.get("/v1/jobs?model=echomimic").await;
    assert_eq!(code, 200, "{jobs}");
    let jobs = jobs["jobs"].as_array().unwrap();
    let mut ids: Vec<&str> = jobs.iter().map(|j| j["labels"]["task_id"].as_str().unwrap()).collect();
    ids.sort();
    let mut want = [task_id, slow.as_str(), bad.as_str()];
    want.sort();
    assert_eq!(ids, want, "one job per task_id: {jobs:#?}");
    assert!(jobs.iter().all(|j| j["attempt"] == 1), "{jobs:#?}");

    // An unknown task: 404, on the stream and the polling route.
    let r = seed.http.get(seed.url("/api/tasks/no-such-task/progress")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let (code, _) = seed.get("/api/tasks/no-such-task").await;
    assert_eq!(code, 404);
    let r = seed.http.get(seed.url("/api/tempfile/download/550e8400-e29b-41d4-a716-446655440000")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    println!("seed 002: {} messages {statuses:?}; {:.1} s", live.len(), started.elapsed().as_secs_f64());
}

// ------------------------------------------------------------------------------------------
// Seed 003: SHARP (`/predict`, SSE `/stream`, `/result`, `/metadata`, `/health`).

/// The README's Python client (SSE), verbatim but for the image's name (a PNG) and the test's
/// records, marked `# (test)`.
const SEED_003_CLIENT: &str = r#"
import json
import requests
from sseclient import SSEClient

SEEN = []  # (test) every SSE message, as received

# 1. 提交任务
with open("image.png", "rb") as f:
    response = requests.post(
        "http://localhost:8000/predict",
        files={"file": f}
    )
    predict = {"status_code": response.status_code, "body": response.text}  # (test)
    task_info = response.json()
    task_id = task_info["task_id"]

# 2. 通过 SSE 接收实时状态
sse_url = f"http://localhost:8000/stream/{task_id}"
messages = SSEClient(sse_url)

for msg in messages:
    SEEN.append({"event": msg.event, "data": msg.data})  # (test)
    if msg.event == "status":
        data = json.loads(msg.data)
        status = data["status"]
        
        if status == "failed":
            print(f"Error: {data['message']}")
        else:
            print(f"Status: {status}")
        
        if status in ["completed", "failed"]:
            break

# 3. 下载结果
if data["status"] == "completed":
    response = requests.get(f"http://localhost:8000/result/{task_id}")
    with open("output.sog", "wb") as f:
        f.write(response.content)

print("RESULT " + json.dumps({  # (test)
    "predict": predict, "task_id": task_id, "seen": SEEN,
    "result_status": response.status_code, "result_type": response.headers.get("content-type"),
}))
"#;

/// The statuses of a seed 003 event stream, each event checked: name `status`, data
/// `{"status"}` only (plus `message` when failed).
fn seed_003_statuses(events: &[(String, String)]) -> Vec<String> {
    events
        .iter()
        .map(|(name, data)| {
            assert_eq!(name, "status", "event name: {name} {data}");
            let data: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{data:?}: {e}"));
            let status = data["status"].as_str().unwrap_or_else(|| panic!("{data}")).to_string();
            if status == "failed" {
                assert_eq!(keys(&data), ["message", "status"], "{data}");
            } else {
                assert_eq!(keys(&data), ["status"], "{data}");
            }
            status
        })
        .collect()
}

const SEED_003_STATUSES: [&str; 4] = ["queued", "converting", "compressing", "completed"];

/// `/metadata/{task_id}`, field by field: the camera of a `width` x `height` image at `focal`.
async fn check_seed_003_metadata(seed: &Seed, task_id: &str, focal: Option<f64>, (width, height): (u32, u32)) {
    let (code, meta) = seed.get(&format!("/metadata/{task_id}")).await;
    assert_eq!(code, 200, "{meta}");
    assert_eq!(keys(&meta), ["created_at", "extrinsic_matrix", "intrinsic_matrix", "task_id"], "{meta}");
    assert_eq!(meta["task_id"], task_id);
    assert!(is_seed_time(&meta["created_at"]), "{meta}");
    let k: Vec<f64> = meta["intrinsic_matrix"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(k.len(), 9, "{meta}");
    let f = focal.unwrap_or(k[0]);
    assert_eq!(k, [f, 0.0, width as f64 / 2.0, 0.0, f, height as f64 / 2.0, 0.0, 0.0, 1.0], "{meta}");
    let e: Vec<f64> = meta["extrinsic_matrix"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let identity: Vec<f64> = (0..16).map(|i| if i % 5 == 0 { 1.0 } else { 0.0 }).collect();
    assert_eq!(e, identity, "{meta}");
}

/// A .sog: splat-transform's zip (meta.json and WebP images).
fn check_sog(bytes: &[u8]) {
    assert!(bytes.len() > 100, "{} bytes", bytes.len());
    assert!(bytes.starts_with(b"PK\x03\x04"), "a zip: {:?}", &bytes[..bytes.len().min(8)]);
    assert!(bytes.windows(9).any(|w| w == b"meta.json"), "holds meta.json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_003_sharp_readme_clients() {
    let started = Instant::now();
    let seed = Seed::start("seed-003-sharp.toml").await;
    let work = tempfile::tempdir().unwrap();
    let (width, height) = (32, 24);
    std::fs::write(work.path().join("image.png"), png(width, height)).unwrap();

    // /health before any task.
    let (code, health) = seed.get("/health").await;
    assert_eq!(code, 200, "{health}");
    assert_eq!(keys(&health), ["compression_enabled", "compression_workers", "device", "model_loaded", "status"], "{health}");
    assert_eq!(health["status"], "healthy");
    assert!(health["model_loaded"].is_boolean(), "{health}");
    assert_eq!(health["device"], "cpu");
    assert_eq!((&health["compression_enabled"], &health["compression_workers"]), (&json!(true), &json!(2)));

    // The README's Python client.
    let t = Instant::now();
    let out = python(work.path(), "client.py", SEED_003_CLIENT, "http://localhost:8000", &seed.gateway.base).await;
    let python_s = t.elapsed().as_secs_f64();
    println!("seed 003 python client: {out:#}");
    assert_eq!(out["predict"]["status_code"], 200, "{out}");
    let task_info: Value = serde_json::from_str(out["predict"]["body"].as_str().unwrap()).unwrap();
    let task_id = out["task_id"].as_str().unwrap();
    assert_eq!(task_info, json!({"task_id": task_id, "status": "queued", "message": "null"}));
    let seen: Vec<(String, String)> = out["seen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["event"].as_str().unwrap().to_string(), m["data"].as_str().unwrap().to_string()))
        // An SSE comment (the keep-alive) reaches sseclient as an empty message.
        .filter(|(_, data)| !data.is_empty())
        .collect();
    assert_eq!(seed_003_statuses(&seen), SEED_003_STATUSES, "{seen:#?}\n{}", seed.logs());
    assert_eq!((&out["result_status"], &out["result_type"]), (&json!(200), &json!("application/octet-stream")), "{out}");
    check_sog(&std::fs::read(work.path().join("output.sog")).unwrap());
    check_seed_003_metadata(&seed, task_id, None, (width, height)).await;

    // A late client (here: curl -N, the README's SSE line) replays every status, then the
    // stream ends.
    let stream = curl(&["-s", "-N", &seed.url(&format!("/stream/{task_id}"))], work.path()).await;
    let late: Vec<(String, String)> = parse_sse(&stream).into_iter().map(|(_, name, data)| (name, data)).collect();
    assert_eq!(seed_003_statuses(&late), SEED_003_STATUSES, "{stream}");
    // It starts with `retry:`; an EventSource reconnecting after the last status (the terminal
    // one) is answered 204, which stops it reconnecting.
    assert!(stream.starts_with("retry: 3000\n"), "{stream}");
    let last_id = parse_sse(&stream).last().and_then(|e| e.0.clone()).expect("events carry ids");
    let resumed = seed.http.get(seed.url(&format!("/stream/{task_id}"))).header("last-event-id", last_id).send().await.unwrap();
    assert_eq!(resumed.status(), 204);

    // The README's cURL lines: submit with a focal length, stream, status, result.
    let reply = curl(&["-s", "-X", "POST", &seed.url("/predict"), "-F", "file=@image.png", "-F", "focal_length=1000"], work.path()).await;
    let reply: Value = serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{reply:?}: {e}"));
    let curl_task = reply["task_id"].as_str().unwrap().to_string();
    assert_eq!(reply, json!({"task_id": curl_task, "status": "queued", "message": "null"}));
    let stream = curl(&["-s", "-N", &seed.url(&format!("/stream/{curl_task}"))], work.path()).await;
    let events: Vec<(String, String)> = parse_sse(&stream).into_iter().map(|(_, name, data)| (name, data)).collect();
    assert_eq!(seed_003_statuses(&events), SEED_003_STATUSES, "{stream}");
    let (code, status) = seed.get(&format!("/status/{curl_task}")).await;
    assert_eq!(code, 200);
    assert_eq!(status, json!({"task_id": curl_task, "status": "completed"}));
    curl(&["-s", "-f", &seed.url(&format!("/result/{curl_task}")), "-o", "curl.sog"], work.path()).await;
    check_sog(&std::fs::read(work.path().join("curl.sog")).unwrap());
    check_seed_003_metadata(&seed, &curl_task, Some(1000.0), (width, height)).await;

    // The README's JavaScript client in a real chromium.
    let t = Instant::now();
    let driver = repo().join("tests/browser/seed003.mjs");
    let image = work.path().join("image.png");
    let out = run(
        Path::new("node"),
        &[driver.to_str().unwrap(), &seed.gateway.base, image.to_str().unwrap()],
        work.path(),
        Duration::from_secs(150),
    )
    .await;
    let browser_s = t.elapsed().as_secs_f64();
    let js: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out:?}: {e}"));
    let js_task = js["task_info"]["task_id"].as_str().unwrap_or_else(|| panic!("{js:#}")).to_string();
    assert_eq!(js["task_info"], json!({"task_id": js_task, "status": "queued", "message": "null"}));
    assert_eq!(js["event_source_url"], seed.url(&format!("/stream/{js_task}")));
    let events: Vec<(String, String)> =
        js["status_events"].as_array().unwrap().iter().map(|d| ("status".to_string(), d.as_str().unwrap().to_string())).collect();
    assert_eq!(seed_003_statuses(&events), SEED_003_STATUSES, "{js:#}");
    // (chromium asks for /favicon.ico, which the gateway does not have: not the client's doing)
    let console: Vec<&str> = js["console"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| !l["url"].as_str().is_some_and(|u| u.ends_with("/favicon.ico")))
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert_eq!(console, ["Status: queued", "Status: converting", "Status: compressing", "Task completed!"], "{js:#}");
    assert_eq!(js["result_url"], seed.url(&format!("/result/{js_task}")));
    let result = &js["result"];
    assert_eq!(result["status"], 200, "{js:#}");
    assert_eq!(result["magic"], json!([0x50, 0x4b, 3, 4]), "a zip: {js:#}");
    assert!(result["size"].as_u64().unwrap() > 100, "{js:#}");
    // The snippet's `eventSource.close()` aborts the stream's request when it comes before the
    // gateway's end of the stream: the client's doing, not an error.
    let aborted = format!("request failed: GET {}: net::ERR_ABORTED", seed.url(&format!("/stream/{js_task}")));
    let page_errors: Vec<&Value> = js["page_errors"].as_array().unwrap().iter().filter(|e| **e != aborted.as_str()).collect();
    assert!(page_errors.is_empty(), "{js:#}");
    assert_eq!(js["event_source_errors"], 0, "one connection, no reconnect: {js:#}");

    // /health after the tasks: the model is loaded now.
    let (code, health) = seed.get("/health").await;
    assert_eq!(code, 200, "{health}");
    assert_eq!(
        health,
        json!({"status": "healthy", "model_loaded": true, "device": "cpu", "compression_enabled": true, "compression_workers": 2})
    );

    // A file that is no image: the task fails, and its stream ends with {"status": "failed",
    // "message"}; there is no result.
    let form =
        reqwest::multipart::Form::new().part("file", reqwest::multipart::Part::bytes(b"not an image".to_vec()).file_name("image.jpg"));
    let reply: Value = seed.http.post(seed.url("/predict")).multipart(form).send().await.unwrap().json().await.unwrap();
    let bad = reply["task_id"].as_str().unwrap_or_else(|| panic!("{reply}")).to_string();
    assert_eq!(reply, json!({"task_id": bad, "status": "queued", "message": "null"}));
    let stream = seed.http.get(seed.url(&format!("/stream/{bad}"))).send().await.unwrap();
    let events: Vec<(String, String)> = read_sse(stream, JOB).await.into_iter().map(|(_, name, data)| (name, data)).collect();
    let statuses = seed_003_statuses(&events);
    assert_eq!((statuses.first().map(String::as_str), statuses.last().map(String::as_str)), (Some("queued"), Some("failed")), "{events:?}");
    let failed: Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
    assert!(failed["message"].as_str().is_some_and(|m| !m.is_empty()), "{failed}");
    println!("seed 003 failure: {statuses:?} {failed}");
    let (code, status) = seed.get(&format!("/status/{bad}")).await;
    assert_eq!((code, &status["status"]), (200, &json!("failed")), "{status}");
    assert_eq!(status["message"], failed["message"], "{status}");
    let r = seed.http.get(seed.url(&format!("/result/{bad}"))).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // Unknown tasks: 404 (the README's "文件不存在：返回 404").
    for path in ["/stream/no-such-task", "/result/no-such-task", "/metadata/no-such-task", "/status/no-such-task"] {
        let r = seed.http.get(seed.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    println!("seed 003: python client {python_s:.1} s, browser client {browser_s:.1} s; {:.1} s in all", started.elapsed().as_secs_f64());
}

// ------------------------------------------------------------------------------------------
// What the seed tables refuse, and where they are served from (issue 23, items 10 to 14).

/// A multipart body with one file part.
fn one_file(part: &str, file_name: &str, bytes: Vec<u8>) -> reqwest::multipart::Form {
    reqwest::multipart::Form::new().part(part.to_string(), reqwest::multipart::Part::bytes(bytes).file_name(file_name.to_string()))
}

impl Seed {
    async fn post_form(&self, path: &str, form: reqwest::multipart::Form) -> (u16, Value) {
        let r = self.http.post(self.url(path)).multipart(form).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path}: {status} {text:?} is not JSON: {e}")))
    }

    async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.http.post(self.url(path)).json(body).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path}: {status} {text:?} is not JSON: {e}")))
    }

    /// The jobs of `model` Kiln holds (at most 100).
    async fn jobs(&self, query: &str) -> Vec<Value> {
        let (code, jobs) = self.get(&format!("/v1/jobs?{query}")).await;
        assert_eq!(code, 200, "{jobs}");
        jobs["jobs"].as_array().unwrap().clone()
    }
}

/// A refusal in seed 002's shape: 400, `success: false`, the error naming `field`.
fn check_seed_002_refusal(code: u16, body: &Value, field: &str, says: &str) {
    assert_eq!(code, 400, "{body}");
    assert_eq!(keys(body), ["code", "error", "field", "success"], "{body}");
    assert_eq!((&body["success"], &body["code"], &body["field"]), (&json!(false), &json!("bad_request"), &json!(field)), "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains(&format!("{field:?}")) && error.contains(says), "the error names the seed's field {field:?}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_002_refuses_what_it_cannot_run_naming_its_fields() {
    let seed = Seed::start("seed-002-talking-head.toml").await;

    // Item 10: a file under another part name, and an empty file, are refused (they were
    // stored, `success: true`).
    let (code, body) = seed.post_form("/api/tempfile/upload", one_file("upload", "face.png", png(8, 8))).await;
    check_seed_002_refusal(code, &body, "file", "needs a file part");
    let (code, body) = seed.post_form("/api/tempfile/upload", one_file("file", "face.png", vec![])).await;
    check_seed_002_refusal(code, &body, "file", "empty");

    let upload = |bytes: Vec<u8>, name: &'static str| {
        let seed = &seed;
        async move {
            let (code, body) = seed.post_form("/api/tempfile/upload", one_file("file", name, bytes)).await;
            assert_eq!((code, &body["success"]), (200, &json!(true)), "{body}");
            body["file_id"].as_str().unwrap().to_string()
        }
    };
    let face = upload(png(40, 48), "face.png").await;
    let voice = upload(wav(16_000), "voice.wav").await;

    // Item 12: a task without its audio names the seed's field, `audio_id`, not Kiln's input.
    let task_id = uuid::Uuid::new_v4().to_string();
    let mut task = json!({"task_id": task_id, "session_id": "s-23", "ref_image_id": face, "steps": 2, "cfg": 3.0, "seed": 42});
    let (code, body) = seed.post_json("/api/tasks", &task).await;
    check_seed_002_refusal(code, &body, "audio_id", "needs");
    assert!(!body["error"].as_str().unwrap().contains("input \"audio\""), "{body}");

    // Item 13: the model declares its params; a `cfg` that is no number is refused at submit,
    // naming `cfg`. (task_id and session_id were params, refused by the declaration.)
    task["audio_id"] = json!(voice);
    task["cfg"] = json!("high");
    let (code, body) = seed.post_json("/api/tasks", &task).await;
    check_seed_002_refusal(code, &body, "cfg", "must be a number");
    assert!(seed.jobs("model=echomimic").await.is_empty(), "a refused request queues nothing");

    // Item 14 (d): the seed's dashboard, every task on one channel: one stream for every job
    // of the model, here only session s-23's (the multipart job below is s-24's).
    let mut dashboard = seed.http.get(seed.url("/api/task_progress?label=session_id:s-23")).send().await.unwrap();
    assert_eq!(dashboard.status(), 200, "{}", dashboard.text().await.unwrap());

    // The task as the README sends it runs; its task_id and session_id are the job's labels.
    task["cfg"] = json!(3.0);
    let (code, body) = seed.post_json("/api/tasks", &task).await;
    assert_eq!((code, &body), (200, &json!({"success": true, "task_id": task_id, "status": "processing"})), "{}", seed.logs());
    let jobs = seed.jobs("label=session_id:s-23").await;
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
    assert_eq!(jobs[0]["labels"], json!({"task_id": task_id, "session_id": "s-23"}), "{:#}", jobs[0]);
    assert_eq!(keys(&jobs[0]["params"]), ["cfg", "seed", "steps"], "{:#}", jobs[0]);
    let stream = seed.http.get(seed.url(&format!("/api/tasks/{task_id}/progress"))).send().await.unwrap();
    let messages: Vec<Value> = read_sse(stream, JOB).await.iter().map(|(_, _, data)| serde_json::from_str(data).unwrap()).collect();
    for m in &messages {
        check_seed_002_message(m, &task_id, "s-23");
    }
    assert_eq!(messages.last().map(|m| &m["status"]), Some(&json!("completed")), "{messages:#?}\n{}", seed.logs());

    // Item 13: a multipart `labels` part on /v1/jobs is the job's labels, not an input.
    let form = reqwest::multipart::Form::new()
        .text("model", "echomimic")
        .text("labels", r#"{"session_id": "s-24"}"#)
        .text("params", r#"{"steps": 1}"#)
        .part("ref_image", reqwest::multipart::Part::bytes(png(40, 48)).file_name("face.png"))
        .part("audio", reqwest::multipart::Part::bytes(wav(16_000)).file_name("voice.wav"));
    let r = seed.http.post(seed.url("/v1/jobs")).multipart(form).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let job_id = r.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_string();
    let (_, job) = seed.get(&format!("/v1/jobs/{job_id}")).await;
    assert_eq!(job["labels"], json!({"session_id": "s-24"}), "{job:#}");
    assert_eq!(keys(&job["inputs"]), ["audio", "ref_image"], "{job:#}");
    let done = eventually(JOB, || async {
        let (_, job) = seed.get(&format!("/v1/jobs/{job_id}")).await;
        job["status"] == "completed"
    })
    .await;
    assert!(done, "{}", seed.logs());

    // A second task of the session, then the dashboard: both tasks' messages, each in the
    // order its own stream has them, and none of session s-24's job.
    let second = uuid::Uuid::new_v4().to_string();
    task["task_id"] = json!(second);
    let (code, body) = seed.post_json("/api/tasks", &task).await;
    assert_eq!(code, 200, "{body}");
    let mut text = String::new();
    let completed = |id: &str, events: &[(Option<String>, String, String)]| {
        events.iter().any(|(_, _, data)| data.contains(id) && data.contains("\"completed\""))
    };
    let both = read_sse_until(&mut dashboard, &mut text, |e| completed(&task_id, e) && completed(&second, e)).await;
    assert!(both, "{text}\n{}", seed.logs());
    let seen: Vec<Value> = parse_sse(&text)
        .iter()
        .map(|(_, name, data)| {
            assert_eq!(name, "message", "{data}");
            serde_json::from_str(data).unwrap()
        })
        .collect();
    for id in [&task_id, &second] {
        let of_task: Vec<&Value> = seen.iter().filter(|m| m["task_id"] == id.as_str()).collect();
        for m in &of_task {
            check_seed_002_message(m, id, "s-23");
        }
        let statuses: Vec<&str> = of_task.iter().map(|m| m["status"].as_str().unwrap()).fold(vec![], |mut v, s| {
            if v.last() != Some(&s) {
                v.push(s);
            }
            v
        });
        assert_eq!(statuses, ["processing", "downloading", "face_detecting", "inference", "merging_audio", "completed"], "{seen:#?}");
    }
    assert!(seen.iter().all(|m| m["session_id"] == "s-23"), "{seen:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_002_failed_task_names_no_node_path() {
    // Item 12: the worker names the file it could not read by its path on the node; the
    // task's `error` must say which input, not where the node keeps it.
    let seed = Seed::start("seed-002-talking-head.toml").await;
    let mut ids = vec![];
    for (bytes, name) in [(wav(16_000), "voice.wav"), (wav(16_000), "voice2.wav")] {
        let (code, body) = seed.post_form("/api/tempfile/upload", one_file("file", name, bytes)).await;
        assert_eq!(code, 200, "{body}");
        ids.push(body["file_id"].as_str().unwrap().to_string());
    }
    let task_id = uuid::Uuid::new_v4().to_string();
    let task = json!({"task_id": task_id, "session_id": "s-1", "ref_image_id": ids[0], "audio_id": ids[1], "steps": 2});
    let (code, body) = seed.post_json("/api/tasks", &task).await;
    assert_eq!(code, 200, "{body}");
    let stream = seed.http.get(seed.url(&format!("/api/tasks/{task_id}/progress"))).send().await.unwrap();
    let messages: Vec<Value> = read_sse(stream, JOB).await.iter().map(|(_, _, data)| serde_json::from_str(data).unwrap()).collect();
    let last = messages.last().unwrap();
    assert_eq!(last["status"], "failed", "{messages:#?}");
    let error = last["error"].as_str().unwrap();
    assert!(error.contains("ref_image"), "{last}");
    assert!(!error.contains('/'), "no node path in a task's error: {error}");
    let (_, latest) = seed.get(&format!("/api/tasks/{task_id}")).await;
    assert_eq!(latest["error"], error, "{latest}");
}

/// A refusal in seed 003's (FastAPI's) shape: 400, `detail` naming `field`.
fn check_seed_003_refusal(code: u16, body: &Value, field: &str, says: &str) {
    assert_eq!(code, 400, "{body}");
    assert_eq!(keys(body), ["code", "detail", "field"], "{body}");
    assert_eq!((&body["code"], &body["field"]), (&json!("bad_request"), &json!(field)), "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("{field:?}")) && detail.contains(says), "the error names the seed's field {field:?}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_003_checks_its_inputs_and_params_at_submit() {
    let seed = Seed::start("seed-003-sharp.toml").await;
    let image = || reqwest::multipart::Part::bytes(png(32, 24)).file_name("image.png");

    // Item 11: an empty file was queued and failed later ("unknown image type").
    let (code, body) = seed.post_form("/predict", one_file("file", "image.png", vec![])).await;
    check_seed_003_refusal(code, &body, "file", "empty");
    // A focal length that is no number, or negative, failed the job later too.
    for (focal, says) in [("abc", "must be a number"), ("-5", "allowed: at least 1")] {
        let form = reqwest::multipart::Form::new().part("file", image()).text("focal_length", focal);
        let (code, body) = seed.post_form("/predict", form).await;
        check_seed_003_refusal(code, &body, "focal_length", says);
    }
    // A URL-encoded form (an HTML form's default) without the file: the file is what is
    // missing, not "malformed JSON".
    let r = seed.http.post(seed.url("/predict")).form(&[("focal_length", "1000")]).send().await.unwrap();
    let code = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    check_seed_003_refusal(code, &body, "file", "needs a file part");
    assert!(seed.jobs("model=sharp").await.is_empty(), "a refused request queues nothing");

    // The README's request still queues.
    let form = reqwest::multipart::Form::new().part("file", image()).text("focal_length", "1000");
    let (code, body) = seed.post_form("/predict", form).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(keys(&body), ["message", "status", "task_id"], "{body}");

    // A configured submit route takes the `Idempotency-Key` header too (this one reads no key
    // from its body): the same key twice is one task.
    let keyed = |key: &'static str| {
        let form = reqwest::multipart::Form::new().part("file", image()).text("focal_length", "1000");
        seed.http.post(seed.url("/predict")).header("Idempotency-Key", key).multipart(form).send()
    };
    let first: Value = keyed("sharp-1").await.unwrap().json().await.unwrap();
    let again: Value = keyed("sharp-1").await.unwrap().json().await.unwrap();
    let other: Value = keyed("sharp-2").await.unwrap().json().await.unwrap();
    assert!(first["task_id"].is_string(), "{first}");
    assert_eq!(first["task_id"], again["task_id"], "one key, one task");
    assert_ne!(first["task_id"], other["task_id"]);

    // Item 14 (c): /openapi.json lists the table's routes, with the fields they read.
    let (code, doc) = seed.get("/openapi.json").await;
    assert_eq!(code, 200);
    let predict = &doc["paths"]["/predict"]["post"];
    let form = &predict["requestBody"]["content"]["multipart/form-data"]["schema"];
    assert_eq!((&form["properties"]["file"]["format"], &form["required"]), (&json!("binary"), &json!(["file"])), "{predict:#}");
    assert!(form["properties"]["focal_length"].is_object(), "{predict:#}");
    for path in ["/stream/{task_id}", "/status/{task_id}", "/result/{task_id}", "/metadata/{task_id}", "/health"] {
        assert!(doc["paths"][path]["get"].is_object(), "{path} is listed");
    }
}

/// Copies `examples/http/<table>` to `dir/http/`, beside links to the examples' workers and
/// models: a table somewhere else than in the repository, with its `../` paths.
fn copy_table(dir: &Path, table: &str) -> std::path::PathBuf {
    let examples = repo().join("examples");
    std::fs::create_dir_all(dir.join("http")).unwrap();
    for folder in ["workers", "models"] {
        if !dir.join(folder).exists() {
            std::os::unix::fs::symlink(examples.join(folder), dir.join(folder)).unwrap();
        }
    }
    let to = dir.join("http").join(table);
    std::fs::copy(examples.join("http").join(table), &to).unwrap();
    to
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gateway_serves_several_seed_tables_from_their_own_folders() {
    // Item 14 (a, b): the tables of seeds 001 and 003, copied out of the repository, included
    // by a config in another folder: their relative model paths resolve against each table.
    let tables = tempfile::tempdir().unwrap();
    let seed_001 = copy_table(tables.path(), "seed-001-image-gen.toml");
    let seed_003 = copy_table(tables.path(), "seed-003-sharp.toml");
    let seed = Seed::with(&format!("[http]\ninclude = [{:?}, {:?}]\n", seed_001.display(), seed_003.display())).await;

    // Seed 001's TorchScript model and its Python worker, by the table's `../` paths.
    for model in ["flux-1-dev", "stable-diffusion-v1-5"] {
        let (code, reply) = seed.post_json("/generate_image", &seed_001_body(model)).await;
        assert_eq!(code, 200, "{reply}");
        let task_id = reply["task_id"].as_str().unwrap().to_string();
        let last = seed_001_wait(&seed, &task_id, model).await;
        assert_eq!(last["status"], "completed", "{last}\n{}", seed.logs());
        assert_eq!(png_size(&seed_001_image(&seed, &task_id).await), (64, 64));
    }

    // Seed 003's, from the same gateway and node.
    let (code, health) = seed.get("/health").await;
    assert_eq!((code, &health["status"]), (200, &json!("healthy")), "{health}");
    let form = reqwest::multipart::Form::new().part("file", reqwest::multipart::Part::bytes(png(32, 24)).file_name("image.png"));
    let (code, reply) = seed.post_form("/predict", form).await;
    assert_eq!(code, 200, "{reply}");
    let task_id = reply["task_id"].as_str().unwrap().to_string();
    let stream = seed.http.get(seed.url(&format!("/stream/{task_id}"))).send().await.unwrap();
    let events: Vec<(String, String)> = read_sse(stream, JOB).await.into_iter().map(|(_, name, data)| (name, data)).collect();
    assert_eq!(seed_003_statuses(&events), SEED_003_STATUSES, "{events:?}\n{}", seed.logs());
    let r = seed.http.get(seed.url(&format!("/result/{task_id}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    check_sog(&r.bytes().await.unwrap());
}

/// Seed 004's stream events, in order: each `data:`'s JSON.
fn seed_004_events(events: &[(Option<String>, String, String)]) -> Vec<Value> {
    events.iter().map(|(_, _, data)| serde_json::from_str(data).unwrap_or_else(|e| panic!("{data:?} is not JSON: {e}"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_004_text2image_stream_in_its_own_events() {
    // Item 14: seed 004's users follow its stage's generation by its own event names and
    // fields (README "事件类型说明"); Kiln runs the storyboards as one batch.
    let seed = Seed::start("seed-004-text2image.toml").await;
    let storyboard =
        |id: &str, prompt: &str, width: u32| json!({"id": id, "image_prompt": prompt, "custom_params": {"width": width, "height": 48}});
    // The demo worker refuses a width over 1024: sb-2 fails, with the engine's own reason.
    let body = json!({
        "project_id": "p-1",
        "steps": 2,
        "storyboards": [storyboard("sb-1", "a red fox", 64), storyboard("sb-2", "a blue whale", 5000), storyboard("sb-3", "a green owl", 32)],
    });
    let (code, reply) = seed.post_json("/api/text2image", &body).await;
    assert_eq!(code, 200, "{reply}\n{}", seed.logs());
    assert_eq!(reply["total"], 3, "{reply}");
    let stage_id = reply["stage_id"].as_str().unwrap().to_string();

    let stream = seed.http.get(seed.url(&format!("/api/text2image/{stage_id}/stream"))).send().await.unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    let raw = read_sse(stream, JOB).await;
    let events = seed_004_events(&raw);
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types.first(), Some(&"stage_update"), "{events:#?}");
    assert_eq!(types.last(), Some(&"done"), "{events:#?}");
    let stage = &events[0]["stage"];
    assert_eq!((stage["id"].as_str(), stage["status"].as_str()), (Some(stage_id.as_str()), Some("processing")), "{stage}");
    assert_eq!(stage["stage_type"], "image_generation");
    assert!(is_seed_time(&stage["started_at"]), "{stage}");

    let progress: Vec<&Value> = events.iter().filter(|e| e["type"] == "progress").collect();
    let counts: Vec<(u64, u64)> = progress.iter().map(|e| (e["current"].as_u64().unwrap(), e["total"].as_u64().unwrap())).collect();
    assert_eq!(counts, vec![(1, 3), (2, 3), (3, 3)], "{events:#?}");
    assert!(progress.iter().all(|e| e["message"].is_string() && e["storyboard"].is_string()), "{progress:#?}");

    let mut images: Vec<&Value> = events.iter().filter(|e| e["type"] == "image_generated").collect();
    images.sort_by_key(|e| e["storyboard_id"].as_str().unwrap().to_string());
    assert_eq!(images.len(), 2, "{events:#?}");
    for (image, (storyboard_id, width)) in images.iter().zip([("sb-1", 64), ("sb-3", 32)]) {
        assert_eq!(image["storyboard_id"], storyboard_id, "{image}");
        let i = &image["image"];
        assert_eq!((i["width"].as_u64(), i["height"].as_u64()), (Some(width), Some(48)), "{image}");
        assert!(i["id"].is_string(), "{image}");
        let url = i["url"].as_str().unwrap();
        let bytes = seed.http.get(seed.url(url)).send().await.unwrap().error_for_status().unwrap().bytes().await.unwrap();
        assert_eq!(png_size(&bytes), (width as u32, 48), "{url}");
    }
    let errors: Vec<&Value> = events.iter().filter(|e| e["type"] == "error").collect();
    assert_eq!(errors.len(), 1, "{events:#?}");
    assert_eq!(errors[0]["storyboard_id"], "sb-2", "{errors:#?}");
    assert!(errors[0]["error"].as_str().unwrap().contains("width"), "{errors:#?}");
    assert_eq!(types.len(), 1 + 3 + 2 + 1 + 1, "nothing else: {types:?}");

    let done = events.last().unwrap();
    assert!(done["message"].is_string(), "{done}");
    assert_eq!(done["data"]["total_storyboards"], 3, "{done}");
    assert_eq!((done["data"]["success_count"].as_u64(), done["data"]["failed_count"].as_u64()), (Some(2), Some(1)), "{done}");
    let mut generated: Vec<&str> = done["data"]["generated_image_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let mut image_ids: Vec<&str> = images.iter().map(|e| e["image"]["id"].as_str().unwrap()).collect();
    generated.sort();
    image_ids.sort();
    assert_eq!(generated, image_ids, "{done}");
    assert_eq!((done["stage"]["id"].as_str(), done["stage"]["status"].as_str()), (Some(stage_id.as_str()), Some("partial")), "{done}");

    // A client that reconnects with the id of the first progress gets what followed it only.
    let first_progress = raw.iter().position(|(_, _, d)| d.contains("\"progress\"")).unwrap();
    let last_id = raw[first_progress].0.clone().expect("events carry ids");
    let resumed =
        seed.http.get(seed.url(&format!("/api/text2image/{stage_id}/stream"))).header("last-event-id", last_id).send().await.unwrap();
    let rest = seed_004_events(&read_sse(resumed, JOB).await);
    let after: Vec<&Value> = events[first_progress + 1..].iter().collect();
    assert_eq!(rest.iter().collect::<Vec<_>>(), after, "the rest, counted as before");
    // One that reconnects after `done` (the batch's end) is answered 204.
    let last_id = raw.last().and_then(|e| e.0.clone()).expect("events carry ids");
    let ended =
        seed.http.get(seed.url(&format!("/api/text2image/{stage_id}/stream"))).header("last-event-id", last_id).send().await.unwrap();
    assert_eq!(ended.status(), 204);

    // A request without storyboards is refused naming the field, in the seed's error shape.
    let (code, refused) = seed.post_json("/api/text2image", &json!({"project_id": "p-1", "storyboards": []})).await;
    assert_eq!((code, refused["type"].as_str(), refused["code"].as_str()), (400, Some("error"), Some("bad_request")), "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("storyboards"), "{refused}");
}
