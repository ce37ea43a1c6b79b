"""The chat page in a real browser against the real stack: streamed replies, stop, edit, regenerate,
conversations kept in the browser, model output that cannot inject markup, and clear error banners."""

import json

from playwright.sync_api import Page, Route, expect

from tests.web.conftest import CHAT_MODEL, SLOW_MODEL, ConsoleErrors, WebStack


def open_chat(page: Page, stack: WebStack, model: str = CHAT_MODEL) -> None:
    page.goto(f"{stack.url}/#/chat?model={model}")
    expect(page.locator("#model-select")).to_have_value(model)


def send(page: Page, text: str) -> None:
    page.fill("#composer", text)
    page.press("#composer", "Enter")


def test_a_message_gets_a_streamed_reply_with_its_token_counts(page: Page, web_stack: WebStack) -> None:
    open_chat(page, web_stack)
    page.fill("input[name=temperature]", "0")  # greedy: the reply is the same every run, and not empty
    page.fill("input[name=max_tokens]", "24")
    page.fill("#composer", "Hello")
    page.press("#composer", "Shift+Enter")  # a new line, not a send
    page.type("#composer", "there")
    page.press("#composer", "Enter")
    user = page.locator(".message.user .bubble")
    expect(user).to_have_text("Hello\nthere")
    reply = page.locator(".message.assistant").last
    expect(reply.locator(".facts")).to_contain_text("tokens", timeout=30_000)
    assert reply.locator(".bubble").inner_text().strip()
    expect(reply.locator(".facts")).to_contain_text(CHAT_MODEL)
    # the conversation is kept in the browser: a reload shows it, named after its first message
    page.reload()
    expect(page.locator(".message.user .bubble")).to_have_text("Hello\nthere")
    expect(page.locator("#conversation-list li.current a")).to_have_text("Hello there")


def test_stop_ends_the_reply_and_frees_the_servers_row(page: Page, web_stack: WebStack) -> None:
    open_chat(page, web_stack, SLOW_MODEL)
    page.fill("input[name=temperature]", "0")  # greedy: this model never ends a reply by itself
    page.fill("input[name=max_tokens]", "4000")
    send(page, "Go on forever")
    reply = page.locator(".message.assistant .bubble").last
    expect(reply).not_to_be_empty(timeout=30_000)
    assert web_stack.metric("inference_running_sequences") == 1
    page.click("#stop")
    expect(page.locator(".message.assistant .facts").last).to_contain_text("stopped")
    expect(page.locator("#send")).to_be_visible()
    # the proxy dropped the upstream stream: the row is free again within a step or two
    for _ in range(50):
        if web_stack.metric("inference_running_sequences") == 0:
            break
        page.wait_for_timeout(100)
    assert web_stack.metric("inference_running_sequences") == 0


def test_edit_an_earlier_message_and_regenerate_the_reply(page: Page, web_stack: WebStack) -> None:
    open_chat(page, web_stack)
    page.fill("input[name=temperature]", "0")
    page.fill("input[name=max_tokens]", "16")
    send(page, "First question")
    expect(page.locator(".message.assistant .facts")).to_contain_text("tokens", timeout=30_000)
    send(page, "Second question")
    expect(page.locator(".message.assistant .facts")).to_have_count(2, timeout=30_000)
    expect(page.locator(".message.assistant .facts").last).to_contain_text("tokens", timeout=30_000)
    # edit the first message: everything after it goes, and a new reply comes for the edited text
    page.locator(".message.user").first.locator("button.edit").click()
    page.fill(".edit-box textarea", "First question, edited")
    page.click(".edit-box button[type=submit]")
    expect(page.locator(".message.user .bubble")).to_have_text(["First question, edited"])
    expect(page.locator(".message.assistant .facts")).to_contain_text("tokens", timeout=30_000)
    first_reply = page.locator(".message.assistant .bubble").inner_text()
    # regenerate: the last reply is replaced (greedy: by the same text), not added to
    page.click("button.regenerate")
    expect(page.locator(".message.assistant .facts")).to_contain_text("tokens", timeout=30_000)
    expect(page.locator(".message")).to_have_count(2)
    assert page.locator(".message.assistant .bubble").inner_text() == first_reply


def test_markup_in_a_reply_shows_as_text_and_never_runs(page: Page, web_stack: WebStack) -> None:
    hostile = '<script>window.pwned = 1</script> and <img src=x onerror="window.pwned = 2">\n\n**bold**'
    tool = "<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>"

    def canned(route: Route) -> None:  # the model server's stream, with a reply no model gave us
        chunks = [
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {"content": hostile}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {"content": f" {tool}"}, "finish_reason": "stop"}]},
        ]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        route.fulfill(status=200, body=body, headers={"Content-Type": "text/event-stream"})

    page.route("**/v1/chat/completions", canned)
    open_chat(page, web_stack)
    send(page, "Say something nasty")
    bubble = page.locator(".message.assistant .bubble")
    expect(bubble).to_contain_text("<script>window.pwned = 1</script>")
    expect(bubble).to_contain_text('<img src=x onerror="window.pwned = 2">')
    assert bubble.locator("script, img").count() == 0
    expect(bubble.locator("strong")).to_have_text("bold")  # markdown still renders
    expect(bubble.locator(".tool.call")).to_contain_text("6*7")  # the tool call, set apart
    expect(bubble.locator(".tool.output")).to_contain_text("42")
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None


def test_a_wrong_token_shows_a_banner_and_asks_for_the_right_one(
    page: Page, web_stack: WebStack, console: ConsoleErrors
) -> None:
    console.expected = ["401"]  # the browser logs the refused request
    page.goto(web_stack.url)
    page.evaluate("localStorage.setItem('nanochat.token', 'wrong-token')")
    page.goto(f"{web_stack.url}/#/chat")
    expect(page.locator("#banner")).to_contain_text("API token is missing or wrong")
    # the page asks for the token at once; entering the right one clears the banner
    expect(page.locator("#token-dialog")).to_be_visible()
    page.fill("#token-input", web_stack.token)
    page.click("#token-save")
    expect(page.locator("#banner")).to_be_hidden()
    expect(page.locator("#model-select option").first).to_be_attached()


def test_a_full_queue_shows_a_retry_countdown_and_retrying_gets_the_reply(
    page: Page, web_stack: WebStack, console: ConsoleErrors
) -> None:
    console.expected = ["429"]
    refused = []

    def busy_once(route: Route) -> None:  # the first request finds the queue full, as a 429
        if refused:
            route.continue_()
            return
        refused.append(route.request.url)
        error = {"error": {"message": "The server is busy", "type": "rate_limit_error", "code": "queue_full"}}
        route.fulfill(status=429, json=error, headers={"Retry-After": "2"})

    page.route("**/v1/chat/completions", busy_once)
    open_chat(page, web_stack)
    page.fill("input[name=max_tokens]", "8")
    send(page, "Anyone there?")
    banner = page.locator("#banner")
    expect(banner).to_contain_text("The server is busy")
    expect(banner.locator("button")).to_contain_text("Retry in")
    banner.locator("button").click()
    expect(banner).to_be_hidden()
    expect(page.locator(".message.assistant .facts")).to_contain_text("tokens", timeout=30_000)
    expect(page.locator(".message.user")).to_have_count(1)  # the retry did not send the message twice


def test_conversations_are_named_searched_renamed_and_deleted(page: Page, web_stack: WebStack) -> None:
    open_chat(page, web_stack)
    page.fill("input[name=max_tokens]", "4")
    for text in ("About apples", "About pears"):
        page.click("#new-chat")
        send(page, text)
        expect(page.locator(".message.assistant .facts")).to_contain_text("tokens", timeout=30_000)
    chats = page.locator("#conversation-list li a")
    expect(chats).to_have_text(["About pears", "About apples"])
    page.fill("#chat-search", "apples")
    expect(chats).to_have_text(["About apples"])
    page.fill("#chat-search", "")
    page.once("dialog", lambda dialog: dialog.accept("Fruit: pears"))
    page.get_by_role("button", name="Rename About pears").click()
    expect(chats.first).to_have_text("Fruit: pears")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete About apples").click()
    expect(chats).to_have_text(["Fruit: pears"])
    page.reload()  # all of it kept in the browser
    expect(page.locator("#conversation-list li a")).to_have_text(["Fruit: pears"])


def test_copy_puts_the_reply_on_the_clipboard(page: Page, web_stack: WebStack) -> None:
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    open_chat(page, web_stack)
    # greedy: a sampled reply of the random-weight model may hold a control character, which the
    # clipboard keeps and the rendered bubble drops
    page.fill("input[name=temperature]", "0")
    page.fill("input[name=max_tokens]", "8")
    send(page, "Say something")
    reply = page.locator(".message.assistant")
    expect(reply.locator(".facts")).to_contain_text("tok/s", timeout=30_000)
    reply.locator("button.copy").click()
    expect(reply.locator("button.copy")).to_have_text("Copied")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied and copied.strip() in reply.locator(".bubble").inner_text().replace("\n", "")


def test_with_no_model_yet_the_banner_says_how_to_get_one(page: Page, web_stack: WebStack) -> None:
    page.route("**/v1/models", lambda route: route.fulfill(json={"object": "list", "data": []}))
    page.goto(f"{web_stack.url}/#/chat")
    expect(page.locator("#banner")).to_contain_text("No model to chat with yet")
